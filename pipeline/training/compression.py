"""The three ways to a smaller, faster model, as model-in, model-out functions (the compress
stage runs them inside MLflow runs): the distillation loss the engine trains a student with,
structured pruning (Torch-Pruning) and int8 static quantization (ONNX Runtime)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import PruneConfig
from pipeline.errors import ConfigError
from pipeline.training.models import ModelSpec, changed_widths


def distillation_loss(teacher: nn.Module, temperature: float, alpha: float, smoothing: float):
    """The engine's `loss` hook for knowledge distillation (Hinton, Vinyals, Dean 2015,
    "Distilling the knowledge in a neural network"): alpha x T^2 x KL(teacher || student) on
    outputs softened by temperature T, plus (1 - alpha) x cross-entropy to the labels (with
    train.label_smoothing). The teacher sees the same (augmented) batch, in eval mode, without
    gradients; it moves to the batch's device on the first call."""
    teacher.eval().requires_grad_(False)
    placed = []

    def loss(logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if not placed:
            teacher.to(inputs.device)
            placed.append(inputs.device)
        with torch.no_grad():
            target = F.log_softmax(teacher(inputs).float() / temperature, dim=1)
        student = F.log_softmax(logits.float() / temperature, dim=1)
        soft = F.kl_div(student, target, log_target=True, reduction="batchmean")
        hard = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        return alpha * temperature**2 * soft + (1 - alpha) * hard

    return loss


def prune(model: nn.Module, spec: ModelSpec, cfg: PruneConfig) -> tuple[ModelSpec, dict]:
    """Remove whole channels (convolutions, with their norms) and hidden units (linear layers)
    of smallest L2 norm, with Torch-Pruning's dependency graph so coupled layers shrink together;
    the output layer keeps its classes. `cfg.sparsity` is the share removed from every prunable
    layer; with `max_params` / `max_macs` it prunes in 5 % steps until within the budget.
    Returns the pruned network's spec (its `layers` record every changed width, so `rebuild`
    makes it) and its state dict. Raises ConfigError for a budget it cannot reach."""
    import copy

    import torch_pruning as tp

    model = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(1, *spec.shape)
    output = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    budget = cfg.max_params is not None or cfg.max_macs is not None
    steps = 18 if budget else 1  # 5 % steps up to 90 % with a budget
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.9 if budget else cfg.sparsity,
        iterative_steps=steps,
        ignored_layers=[output],
    )
    for _ in range(steps):
        pruner.step()
        macs, params = tp.utils.count_ops_and_params(model, example)
        if budget and _within(cfg, params, macs):
            break
    else:
        if budget and not _within(cfg, params, macs):
            raise ConfigError(
                f"compress.prune: removing 90 % of every layer's channels leaves {params:,.0f} "
                f"parameters and {macs:,.0f} MACs, over the budget (max_params "
                f"{_yaml(cfg.max_params)}, max_macs {_yaml(cfg.max_macs)}); raise it or use a "
                "smaller model"
            )
    return replace(spec, layers=changed_widths(spec, model) or None), model.state_dict()


def _yaml(value) -> str:
    return "null" if value is None else f"{value:,}"


def _within(cfg: PruneConfig, params: float, macs: float) -> bool:
    return (cfg.max_params is None or params <= cfg.max_params) and (
        cfg.max_macs is None or macs <= cfg.max_macs
    )


def quantize(float_onnx: Path, out: Path, calibration: np.ndarray, per_channel: bool) -> Path:
    """int8 static quantization with ONNX Runtime: weights int8 (per output channel), activations
    uint8 with ranges set by running `calibration` (raw pixels N x C x H x W, 0..255) through the
    float model, in QDQ form (ONNX Runtime fuses it into int8 kernels on CPU). The graph is first
    pre-processed (shape inference, optimization) as ONNX Runtime recommends. The input stays
    float32 raw pixels: the same input contract as the float model."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pipeline.training.runtime import INPUT

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(calibration), 64))

        def get_next(self):
            start = next(self.batches, None)
            if start is None:
                return None
            return {INPUT: np.asarray(calibration[start : start + 64], dtype=np.float32)}

    prepared = out.with_suffix(".prepared.onnx")
    quant_pre_process(str(float_onnx), str(prepared))
    quantize_static(
        str(prepared),
        str(out),
        Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    prepared.unlink()
    return out
