"""Optimizer factory and the learning-rate schedule as a pure function of the step.

The engine sets each group's lr from `lr_factor` before every step (as nanoGPT does), so the
schedule needs no scheduler object and its whole state is the step count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import OptimizerConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and conv kernels only; biases and norm scales stay undecayed (nanoGPT).

    Without weight decay the split changes nothing, so one group: each group costs a pass of
    Python in every `optimizer.step()`, about 4 % of an MLP step on CPU (bench/engine.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": params, "weight_decay": 0.0}]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """`fused` (CUDA): one kernel per step for SGD/Adam/AdamW; RMSprop has no fused version."""
    groups = param_groups(model, cfg.weight_decay)
    fast = {"fused": True} if fused else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fast
        )
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, **fast)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **fast)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_factor(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> float:
    """Multiplier on the base lr at optimizer step `step` (0-based)."""
    total = steps_per_epoch * epochs
    epoch = step / steps_per_epoch  # fractional, so per-epoch decays stay smooth within an epoch
    # Phase 1: optional linear warmup, multiplied onto whatever the schedule says.
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    # Phase 2: the schedule itself.
    if cfg.name == "constant":
        factor = 1.0
    elif cfg.name == "exponential":
        factor = cfg.gamma ** math.floor(epoch)
    elif cfg.name == "step":
        factor = cfg.gamma ** (math.floor(epoch) // cfg.step_size)
    elif cfg.name == "multistep":
        factor = cfg.gamma ** sum(math.floor(epoch) >= m for m in cfg.milestones)
    elif cfg.name == "cosine":
        progress = min(1.0, step / max(1, total - 1))
        factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )
    elif cfg.name == "onecycle":
        factor = _one_cycle(step, total, cfg)
    else:
        raise ValueError(f"unknown schedule {cfg.name!r}")
    return warm * factor


def _one_cycle(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Cosine rise from lr/div_factor to lr over pct_start, then cosine fall to the final lr."""
    start = 1 / cfg.div_factor
    end = start / cfg.final_div_factor
    peak_step = max(1, round(cfg.pct_start * total) - 1)

    def cos_interp(a: float, b: float, t: float) -> float:
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    if step <= peak_step:
        return cos_interp(start, 1.0, step / peak_step)
    return cos_interp(1.0, end, (step - peak_step) / max(1, total - 1 - peak_step))
