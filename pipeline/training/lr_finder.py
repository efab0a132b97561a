"""Learning-rate range test (Smith, "Cyclical Learning Rates", 2015; as fastai and Lightning ship
it): from the initial weights, train for up to `steps` batches while the learning rate grows
exponentially from `start` to `end`, smooth the loss, and stop once it diverges.

The suggestion is a tenth of the lr at the smoothed loss minimum (fastai's `minimum` rule): the
largest lr that still lowers the loss, backed off by a decade to leave room for a whole run. The
smoothing is light (an EMA of about 10 steps) because over 100 steps of x1.2 each a heavier one
lags the raw loss by a decade or more and moves every suggestion right; the steepest-descent point
of the smoothed curve, tried first, overshot the best lr of a grid on digits for the same
reason (BENCHMARKS.md, Search). Any optimizer and model of the config works: the test
builds them as training would, and only the lr changes per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.data.store import Split
from pipeline.training import distributed
from pipeline.training.batches import make_batches, pixel_stats, split_validation
from pipeline.training.engine import pick_device, seed_everything
from pipeline.training.models import ModelSpec, rebuild
from pipeline.training.optim import build_optimizer

SMOOTHING = 0.9  # exponential moving average of the loss, bias-corrected (see above)
DIVERGED = 4.0  # stop when the smoothed loss exceeds this many times its minimum


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]  # raw, per step
    smoothed: list[float]
    suggestion: float
    method: str  # the rule, recorded with the run (min/10; earlier versions: steepest)
    diverged: bool  # stopped before `end`

    def to_dict(self) -> dict:
        return {
            "suggested_lr": self.suggestion,
            "method": self.method,
            "steps": len(self.lrs),
            "diverged": self.diverged,
        }


def range_test(
    cfg: TrainConfig,
    split: Split,
    classes: list[str],
    seed: int,
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 100,
) -> RangeTest:
    """Run the range test (see the module docstring) on the training share of `split` (uint8
    images (N, C, H, W) 0..255, int64 labels (N,)): up to `steps` optimizer steps with the lr
    growing geometrically from `start` to `end` (lrs in the optimizer's units), stopping once
    the smoothed loss diverges (`DIVERGED` x its minimum, or NaN/Inf). Returns the lrs, the
    raw and smoothed losses per step and the suggestion (min/10)."""
    device = pick_device(cfg.device)
    seed_everything(seed)
    train_part, _ = split_validation(split, cfg.val_fraction, seed)
    mean, std = pixel_stats(train_part)
    shape = tuple(split.images.shape[1:])
    model = rebuild(ModelSpec(cfg.model.model_dump(), shape, tuple(classes), mean, std)).to(device)
    optimizer = build_optimizer(model, cfg.optimizer.model_copy(update={"lr": start}))
    fmt = torch.contiguous_format
    batches = make_batches(train_part, cfg, device, distributed.Dist(), fmt, cfg.batch_size)
    generator = torch.Generator(device=device).manual_seed(seed)
    growth = (end / start) ** (1 / max(1, steps - 1))
    lrs, losses, smoothed, average, best = [], [], [], 0.0, math.inf
    model.train()
    while len(lrs) < steps:
        for xb, yb in batches.epoch(generator):
            lr = start * growth ** len(lrs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(model(xb), yb, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            average = SMOOTHING * average + (1 - SMOOTHING) * value
            current = average / (1 - SMOOTHING ** (len(lrs) + 1))
            lrs.append(lr), losses.append(value), smoothed.append(current)
            if not math.isfinite(current) or current > DIVERGED * best:
                return _suggest(lrs, losses, smoothed, diverged=True)
            best = min(best, current)
            if len(lrs) == steps:
                break
    return _suggest(lrs, losses, smoothed, diverged=False)


def _suggest(lrs: list[float], losses: list[float], smoothed: list[float], diverged: bool):
    values = np.array([s if math.isfinite(s) else np.inf for s in smoothed])
    lowest = int(np.argmin(values))
    return RangeTest(lrs, losses, smoothed, float(lrs[lowest]) / 10, "min/10", diverged)


def plot(test: RangeTest, path):
    """Loss against lr (log axis), raw and smoothed, the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(test.lrs, test.losses, alpha=0.3, label="loss")
    ax.plot(test.lrs, test.smoothed, label="smoothed")
    ax.axvline(test.suggestion, color="red", ls="--", label=f"suggested {test.suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    finite = [s for s in test.smoothed if math.isfinite(s)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), DIVERGED * min(finite)) * 1.1)
    ax.legend()
    ax.set_title("learning-rate range test")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
