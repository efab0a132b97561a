"""Optimizers: the parameter groups and one small function per optimizer (`choices.OPTIMIZERS`
names them), each `(groups, cfg, fused) -> torch.optim.Optimizer`."""

from __future__ import annotations

import torch
from torch import nn

from pipeline import choices
from pipeline.config import OptimizerConfig


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
    """The optimizer `cfg.name` over `model`'s trainable parameters at lr `cfg.lr`. `fused`
    (CUDA): one kernel per step where the optimizer has one."""
    make = choices.load(choices.OPTIMIZERS, cfg.name)
    return make(param_groups(model, cfg.weight_decay), cfg, fused)


def sgd(groups: list[dict], cfg: OptimizerConfig, fused: bool) -> torch.optim.Optimizer:
    fast = {"fused": True} if fused else {}
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fast)


def adam(groups: list[dict], cfg: OptimizerConfig, fused: bool) -> torch.optim.Optimizer:
    fast = {"fused": True} if fused else {}
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, **fast)


def adamw(groups: list[dict], cfg: OptimizerConfig, fused: bool) -> torch.optim.Optimizer:
    fast = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **fast)


def rmsprop(groups: list[dict], cfg: OptimizerConfig, fused: bool) -> torch.optim.Optimizer:
    """RMSprop has no fused version: `fused` is ignored."""
    return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum)
