"""The training engine: whole splits resident on the device, batches as index slices.

`fit` knows nothing about MLflow or Airflow; it reports each epoch through `on_epoch`.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data.store import Split
from pipeline.models import build_model
from pipeline.optim import build_optimizer, build_scheduler


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/Inf; the run is stopped and nothing is registered."""


class Normalize(nn.Module):
    """Raw pixel values in, standardized values out, so the saved model takes raw images."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class FitResult:
    model: nn.Module
    spec: dict  # what `rebuild` needs: model config, input shape, classes, normalization
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def rebuild(spec: dict) -> nn.Module:
    """The network described by `spec`, with freshly initialized weights."""
    from pipeline.config import ModelConfig

    net = build_model(ModelConfig(**spec["model"]), tuple(spec["shape"]), len(spec["classes"]))
    return nn.Sequential(Normalize(spec["mean"], spec["std"]), net)


def split_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split | None]:
    """Carve a validation split out of train; test stays untouched until evaluate."""
    if fraction == 0:
        return split, None
    order = np.random.RandomState(seed).permutation(len(split.labels))
    n_val = max(1, int(len(order) * fraction))
    val, train = order[:n_val], order[n_val:]
    return (
        Split(split.images[train], split.labels[train]),
        Split(split.images[val], split.labels[val]),
    )


def fit(
    cfg: TrainConfig,
    train_split: Split,
    classes: list[str],
    seed: int,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    seed_everything(seed)
    device = pick_device(cfg.device)
    train_part, val_part = split_validation(train_split, cfg.val_fraction, seed)
    x = torch.as_tensor(train_part.images, dtype=torch.float32, device=device)
    y = torch.as_tensor(train_part.labels, device=device)
    spec = {
        "model": cfg.model.model_dump(),
        "shape": list(train_split.images.shape[1:]),
        "classes": list(classes),
        "mean": float(x.mean()),
        "std": float(x.std()) or 1.0,
    }
    model = rebuild(spec).to(device)
    optimizer = build_optimizer(model, cfg.optimizer)
    steps_per_epoch = -(-len(y) // cfg.batch_size)
    scheduler = build_scheduler(optimizer, steps_per_epoch, cfg.epochs, cfg.schedule)
    loss_fn = nn.CrossEntropyLoss()
    val = None
    if val_part is not None:
        val = (
            torch.as_tensor(val_part.images, dtype=torch.float32, device=device),
            torch.as_tensor(val_part.labels, device=device),
        )
    generator = torch.Generator(device=device).manual_seed(seed)
    history, bad_steps = [], 0
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        order = torch.randperm(len(y), device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for start in range(0, len(y), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            logits = model(x[idx])
            loss = loss_fn(logits, y[idx])
            if not torch.isfinite(loss):
                bad_steps += 1
                if bad_steps >= cfg.max_bad_steps:
                    raise TrainingDiverged(
                        f"loss was NaN/Inf for {bad_steps} consecutive steps (epoch {epoch}); "
                        f"lower train.optimizer.lr (now {cfg.optimizer.lr}) or check the data"
                    )
                continue  # skip the update; the schedule only counts real steps
            bad_steps = 0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y[idx]).sum()
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": float(loss_sum) / len(y),
            "train_accuracy": float(correct) / len(y),
            "epoch_seconds": time.perf_counter() - started,
        }
        if val is not None:
            row.update(_evaluate(model, *val, loss_fn, cfg.batch_size * 4))
        history.append(row)
        _print_epoch(row, cfg.epochs)
        if on_epoch:
            on_epoch(row)
    model.eval()
    return FitResult(model.cpu(), spec, history)


@torch.no_grad()
def _evaluate(model, x, y, loss_fn, batch_size: int) -> dict:
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        loss_sum += float(loss_fn(logits, y[start : start + batch_size])) * len(logits)
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    return {"val_loss": loss_sum / len(y), "val_accuracy": correct / len(y)}


def _print_epoch(row: dict, epochs: int) -> None:
    val = (
        f" val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f}"
        if "val_loss" in row
        else ""
    )
    print(
        f"epoch {row['epoch']:>3}/{epochs} lr {row['lr']:.2e} train_loss {row['train_loss']:.4f} "
        f"train_acc {row['train_accuracy']:.4f}{val} ({row['epoch_seconds']:.2f}s)",
        file=sys.stderr,
        flush=True,
    )
