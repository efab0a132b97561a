"""The training engine: `fit` builds the network from its spec and runs the epoch loop.

The loop is a hand-written PyTorch loop over `batches` (resident on the device, or streamed). The
learning rate is a pure function of the step (`schedules.lr_factor`), so `LoopState` (step, history,
early-stopping counters) plus the model, optimizer and RNG states is the whole resumable state.
`fit` knows nothing about MLflow or Airflow: it reports each epoch through `on_epoch` and
checkpoints to a path it is given.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import interrupts
from pipeline.config import ConfigError, TrainConfig
from pipeline.data.store import Split
from pipeline.errors import CheckpointError, TrainingDiverged
from pipeline.training import checkpoint, distributed
from pipeline.training.augment import crop_flip
from pipeline.training.batches import make_batches, pixel_stats, split_validation
from pipeline.training.models import ModelSpec, rebuild
from pipeline.training.optim import build_optimizer
from pipeline.training.progress import Progress
from pipeline.training.schedules import lr_factor

# (logits, labels, inputs) -> the scalar loss to minimize
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FitResult:
    model: nn.Module
    spec: ModelSpec
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    loader: str = "resident"  # how the training rows were fed: resident | stream
    last_batch: str = "kept"  # "merged": a last batch of one joined the one before it
    steps_per_epoch: int = 0  # optimizer steps per epoch (the schedule's x axis)
    # DP-SGD's guarantee: {"epsilon", "delta", "noise_multiplier", "sample_rate",
    # "max_grad_norm", "accountant"}; None when trained without train.privacy
    privacy: dict | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device is cuda but no CUDA device is visible (torch.cuda.is_available() is "
            "False); use train.device=auto or cpu, or run on a machine with a GPU"
        )
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def fit(
    cfg: TrainConfig,
    train_split: Split,
    classes: list[str],
    seed: int,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint_path: Path | None = None,
    resume: dict | None = None,
    checkpoint_extra: Callable[[], dict] | None = None,
    contract: dict | None = None,
    loss: Loss | None = None,
    start: tuple[ModelSpec, dict] | None = None,
) -> FitResult:
    """Train a fresh model, or continue `resume` (a loaded checkpoint) to `cfg.epochs`.

    train_split: uint8 images (N, C, H, W) 0..255 (a memory map is streamed when it does not
        fit, see `make_batches`) and int64 labels (N,) indexing `classes`; the last
        `cfg.val_fraction` of a seeded shuffle is held out for val_loss / val_accuracy.
    on_epoch(row): called after each epoch with {"epoch" (1-based), "train_loss",
        "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds", ...}.
    checkpoint_path: written atomically after every epoch, with what `checkpoint_extra()` gives
        (called at each checkpoint: the caller's MLflow run may be opened meanwhile).
    contract: the dataset's input contract (data/meta.json), kept in the model's spec.
    loss(logits, labels, inputs) -> scalar: replaces the cross-entropy (with label smoothing),
        e.g. `compression.distillation_loss`; `inputs` are the batch the model saw (augmented).
    start: (spec, state dict) of a model to continue from instead of a fresh one of
        `cfg.model` (a pruned network, fine-tuned).
    With `cfg.privacy.enabled`, DP-SGD (`privacy.make_private`): Poisson-sampled batches,
    per-example clipping and noise, each epoch's `epsilon` in its row; batch norms become group
    norms (recorded in the spec as norm "group"). Single process only.
    Returns a FitResult: the model (normalization in front, eval mode), its spec and the
    epoch history. Raises ConfigError for `lr: auto` (resolve it first) and TrainingDiverged
    after `cfg.max_bad_steps` NaN/Inf losses. Under torchrun every rank calls this; rank 0
    alone reports and writes checkpoints. The loop is the plain PyTorch one (bench/engine.py
    measures it against a hand-written loop).
    """
    if cfg.optimizer.lr == "auto":
        raise ConfigError(
            "train.optimizer.lr is auto: the range test resolves it first (`pipeline train` and "
            "the DAG do that; `pipeline lr-find` shows the curve)"
        )
    dist = distributed.context()
    device = pick_device(cfg.device, dist.local_rank)
    distributed.init(dist, device)
    cuda = device.type == "cuda"
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    _configure_backends(cfg, cuda)
    try:
        seed_everything(seed)
        train_part, val_part = split_validation(train_split, cfg.val_fraction, seed)
        contract = contract or None
        if start is None:
            mean, std = pixel_stats(train_part)
            shape = tuple(train_split.images.shape[1:])
            spec = ModelSpec(cfg.model.model_dump(), shape, tuple(classes), mean, std, contract)
            model = rebuild(spec)
        else:
            spec, weights = start
            model = rebuild(spec)
            model.load_state_dict(weights)
        if cfg.privacy.enabled:
            spec, model = _private_model(spec, model, dist)
        model = model.to(device)
        has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
        fmt = torch.channels_last if cuda and cfg.cuda.channels_last and has_conv else None
        fmt = fmt or torch.contiguous_format
        model = model.to(memory_format=fmt)
        batches = make_batches(
            train_part, cfg, device, dist, fmt, cfg.batch_size, poisson=cfg.privacy.enabled
        )
        val = None
        if val_part is not None:
            val = make_batches(val_part, cfg, device, distributed.Dist(), fmt, cfg.batch_size * 4)
        with interrupts.deferred():  # SIGTERM / SIGINT stop it between steps
            return _Loop(cfg, model, spec, batches, val, device, dist, seed, loss).run(
                on_epoch, checkpoint_path, resume, checkpoint_extra or dict
            )
    finally:
        _set_deterministic(was_deterministic)
        torch.set_flush_denormal(False)


def _private_model(spec: ModelSpec, model: nn.Module, dist) -> tuple[ModelSpec, nn.Module]:
    """The model DP-SGD trains: batch norms (which mix examples) replaced by group norms, said
    and recorded in the spec so that `rebuild` makes the same network."""
    from dataclasses import replace

    from pipeline.training.models import group_norms

    if dist.enabled:
        raise ConfigError("train.privacy runs in one process; train without --nproc")
    if group_norms(model):
        print(
            "train.privacy: batch norms replaced by group norms (DP-SGD needs per-example "
            "gradients); the model's spec records it (norm: group)",
            file=sys.stderr,
        )
        spec = replace(spec, norm="group")
    return spec, model


def _configure_backends(cfg: TrainConfig, cuda: bool) -> None:
    # Tiny Adam moments and gradients late in training turn denormal, and CPU math on
    # denormals is many times slower; zero is as good for them (no effect on CUDA).
    torch.set_flush_denormal(True)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism
    _set_deterministic(cfg.deterministic)
    if cuda:
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = cfg.cuda.tf32
        torch.backends.cudnn.allow_tf32 = cfg.cuda.tf32


def _set_deterministic(mode: bool) -> None:
    # Only on a change: every call imports torch._inductor (2.5 s of a CPU `pipeline train`).
    if torch.are_deterministic_algorithms_enabled() != mode:
        torch.use_deterministic_algorithms(mode)


@dataclass
class LoopState:
    """What carries over from one epoch to the next, and through a checkpoint."""

    step: int = 0  # the LR schedule's whole state
    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    best_val_loss: float = math.inf
    bad_epochs: int = 0  # epochs without improvement, for early stopping

    @property
    def epoch(self) -> int:
        return len(self.history)

    def to_checkpoint(self) -> dict:
        return {"format": 1, "epoch": self.epoch, **asdict(self)}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> LoopState:
        state = cls(**{f.name: saved[f.name] for f in fields(cls)})
        state.history = list(state.history)
        return state


class _Loop:
    """One training run's moving parts; `run` is the epoch loop, `train_epoch` the hot path."""

    def __init__(self, cfg: TrainConfig, model, spec, batches, val, device, dist, seed, loss):
        self.cfg, self.model, self.spec = cfg, model, spec
        self.batches, self.val, self.device, self.dist = batches, val, device, dist
        cuda = device.type == "cuda"
        self.optimizer = build_optimizer(
            model, cfg.optimizer, fused=cuda and cfg.cuda.fused_optimizer
        )
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # The functional form: a module call adds ~2.5 us of hooks bookkeeping per step on CPU.
        self.loss_fn = partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)
        self.loss_hook = loss
        amp = cfg.cuda.amp if cuda else "off"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else nullcontext
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        self.net = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        self.private = None
        if cfg.privacy.enabled:
            from pipeline.training import privacy

            self.private = privacy.make_private(
                model, self.optimizer, cfg, batches.n, self.generator
            )
            self.optimizer, self.net = self.private.optimizer, self.private.module
        if cuda and cfg.cuda.compile:
            self.net = torch.compile(self.net)
        self.steps_per_epoch = batches.steps
        if batches.merged and dist.main:
            print(
                f"train: {batches.samples} training images leave a last batch of 1, which batch "
                f"norm cannot train on: it joins the batch before it ({cfg.batch_size + 1} "
                "images); the run's tag train.last_batch says so",
                file=sys.stderr,
            )
        self.augment = cfg.augment.crop_padding > 0 or cfg.augment.flip
        self.state = LoopState()

    def run(self, on_epoch, checkpoint_path, resume, extra) -> FitResult:
        if resume is not None:
            self._restore(resume)
        # every rank from the same epoch and step, or none trains (never a silent restart)
        distributed.agree((self.state.epoch, self.state.step), "the epoch to resume", self.dist)
        cfg, progress = self.cfg, Progress(self.cfg.epochs, enabled=self.dist.main)
        stopped_early = False
        for epoch in range(self.state.epoch + 1, cfg.epochs + 1):
            progress.start_epoch(epoch, self.batches.samples)
            try:
                row = self.train_epoch(epoch, progress if progress.enabled else None)
            except ValueError as exc:
                if "Expected more than 1 value per channel" not in str(exc):
                    raise
                raise ConfigError(  # a batch of one image reaching a 1x1 batch norm
                    f"train.batch_size={cfg.batch_size}: {cfg.model.name}'s batch norm cannot "
                    "train on batches of one image (its last block is 1x1); use "
                    "train.batch_size >= 2"
                ) from None
            if self.val is not None:
                row.update(self.evaluate())
                stopped_early = self._no_longer_improving(row["val_loss"])
            self.state.history.append(row)
            if checkpoint_path is not None and self.dist.main:
                checkpoint.save(self._state(extra), checkpoint_path)
            distributed.barrier(self.dist)
            progress.end_epoch(row)
            if on_epoch is not None and self.dist.main:
                on_epoch(row)
            if stopped_early:
                break
        self.model.eval()
        history = self.state.history
        return FitResult(
            self.model.cpu(),
            self.spec,
            history,
            stopped_early,
            self.batches.kind,
            "merged" if self.batches.merged else "kept",
            self.steps_per_epoch,
            self._guarantee(),
        )

    def _guarantee(self) -> dict | None:
        """DP-SGD's (epsilon, delta) and what made it; the model loses its per-example hooks."""
        if self.private is None:
            return None
        self.private.module.to_standard_module()  # per-example hooks and buffers removed
        p = self.cfg.privacy
        return {
            "epsilon": self.private.epsilon(),
            "delta": self.private.delta,
            "noise_multiplier": self.private.noise_multiplier,
            "sample_rate": self.private.sample_rate,
            "max_grad_norm": p.max_grad_norm,
            "accountant": p.accountant,
        }

    def train_epoch(self, epoch: int, progress: Progress | None) -> dict:
        cfg, optimizer, base_lr = self.cfg, self.optimizer, self.cfg.optimizer.lr
        check_every = cfg.max_bad_steps
        state = self.state
        started, lr_at_start = time.perf_counter(), base_lr * self._lr_factor(state.step)
        self.net.train()
        loss_sum = torch.zeros((), device=self.device)
        stop = interrupts.pending
        for i, (xb, yb) in enumerate(self.batches.epoch(self.generator), start=1):
            if stop:
                interrupts.check()
            if not len(yb):  # an empty Poisson sample, probability (1 - q)^N: about e^-batch
                self.private.accountant.step(
                    noise_multiplier=self.private.noise_multiplier,
                    sample_rate=self.private.sample_rate,
                )  # still counted: skipping it adds at most that probability to delta
                state.step += 1
                continue
            if self.augment:
                xb = crop_flip(
                    xb,
                    self.generator,
                    cfg.augment.crop_padding,
                    cfg.augment.flip,
                    self.spec.mean,
                )
            lr = base_lr * self._lr_factor(state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with self.autocast():
                if self.loss_hook is None:
                    loss = self.loss_fn(self.net(xb), yb)
                else:
                    loss = self.loss_hook(self.net(xb), yb, xb)
            optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                optimizer.step()
            else:
                self._scaled_step(loss)
            state.step += 1
            loss_sum += loss.detach()
            if i % check_every == 0 and not torch.isfinite(loss_sum):  # one sync per check
                self._diverged(epoch)
            if progress is not None:
                progress.step(i, len(yb), loss_sum, lr)
        if not torch.isfinite(loss_sum):
            self._diverged(epoch)
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch,
            "lr": lr_at_start,
            "train_loss": float(distributed.mean(loss_sum / max(1, i), self.dist)),
            "epoch_seconds": seconds,
            "samples_per_second": self.batches.samples * self.dist.world / seconds,
        }
        if self.private is not None:
            row["epsilon"] = self.private.epsilon()  # spent so far, at the run's delta
        return row

    def _scaled_step(self, loss: torch.Tensor) -> None:
        """fp16: scale the loss so small gradients survive; the scaler skips inf/NaN steps."""
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _lr_factor(self, step: int) -> float:
        return lr_factor(step, self.steps_per_epoch, self.cfg.epochs, self.cfg.schedule)

    def _diverged(self, epoch: int) -> None:
        clip = "lower train.privacy.max_grad_norm" if self.private else "set train.grad_clip"
        raise TrainingDiverged(
            f"loss became NaN/Inf in epoch {epoch} (checked every {self.cfg.max_bad_steps} "
            f"steps, train.max_bad_steps); lower train.optimizer.lr (now "
            f"{self.cfg.optimizer.lr}), {clip}, or check the data"
        )

    @torch.no_grad()
    def evaluate(self) -> dict:
        """val_loss is the plain cross-entropy, without the label smoothing training uses:
        smoothing raises the loss floor, so trials with other smoothing would not compare."""
        self.net.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for xb, yb in self.val.in_order():
            with self.autocast():
                logits = self.model(xb)
            loss_sum += F.cross_entropy(logits.float(), yb) * len(yb)
            correct += (logits.argmax(1) == yb).sum()
        n = self.val.n
        return {"val_loss": float(loss_sum) / n, "val_accuracy": float(correct) / n}

    def _no_longer_improving(self, val_loss: float) -> bool:
        """Early stopping on validation loss; patience 0 never stops."""
        state = self.state
        if val_loss < state.best_val_loss - self.cfg.early_stopping.min_delta:
            state.best_val_loss, state.bad_epochs = val_loss, 0
        else:
            state.bad_epochs += 1
        patience = self.cfg.early_stopping.patience
        return patience > 0 and state.bad_epochs >= patience

    def _state(self, extra: Callable[[], dict]) -> dict:
        return {
            **extra(),
            **self.state.to_checkpoint(),
            "spec": self.spec.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": checkpoint.rng_state(self.generator),
            "privacy": self.private.state_dict() if self.private is not None else None,
        }

    def _restore(self, state: dict) -> None:
        if state.get("spec") != self.spec.to_dict():
            raise CheckpointError(
                "the checkpoint was written for another model, input shape or normalization; "
                "delete it or train without --resume"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.state = LoopState.from_checkpoint(state)
        checkpoint.restore_rng(state["rng"], self.generator)
        if self.private is not None:
            if not state.get("privacy"):
                raise CheckpointError(
                    "the checkpoint was written without train.privacy and holds no privacy "
                    "accountant; delete it or train without --resume"
                )
            self.private.load_state_dict(state["privacy"])
