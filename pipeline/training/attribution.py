"""Attributions: how much each pixel of an image moved a model toward a class, by the methods of
`choices.ATTRIBUTIONS`, each computed by Captum (Kokhlikyan et al. 2020, arXiv:2009.07896).

Every method takes raw pixels (N, C, H, W) float32 0..255, as the models do (normalization is
inside them), and the class to explain per image; it returns signed attributions (N, H, W),
summed over channels. Methods that need gradients cannot run on an ONNX model
(`runtime.OnnxModel`); the perturbation methods (occlusion, KernelSHAP, LIME) run on any model.
The baseline, the "absence" of a feature, is a black image (0) throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.config import ExplainConfig


@dataclass(frozen=True)
class Method:
    """One attribution method: `attribute(model, inputs, targets, cfg)` -> (N, C, H, W) tensor."""

    gradients: bool  # needs the model's gradients (not an ONNX model)
    attribute: Callable[[nn.Module, torch.Tensor, torch.Tensor, ExplainConfig], torch.Tensor]


def _integrated_gradients(model, inputs, targets, cfg):
    """Sundararajan et al. 2017: the gradient averaged along the straight path from the black
    image to the input, times (input - black); the attributions sum to the logit's change.
    Costs `steps` forward + backward passes per image."""
    from captum.attr import IntegratedGradients

    return IntegratedGradients(model).attribute(
        inputs, baselines=0.0, target=targets, n_steps=cfg.steps, internal_batch_size=256
    )


def _saliency(model, inputs, targets, cfg):
    """Simonyan et al. 2014: |d logit / d pixel| at the input; one backward pass per image,
    local (says what a small change would do, not what the pixel contributed)."""
    from captum.attr import Saliency

    return Saliency(model).attribute(inputs, target=targets, abs=True)


def _occlusion(model, inputs, targets, cfg):
    """Zeiler & Fergus 2014: the logit's drop when a `patch` x `patch` window is blacked out,
    slid with half-window strides; about (side / stride)^2 forward passes per image."""
    from captum.attr import Occlusion

    c, h, w = inputs.shape[1:]
    p = patch_size(cfg, h, w)
    s = max(1, p // 2)
    return Occlusion(model).attribute(
        inputs,
        sliding_window_shapes=(c, p, p),
        strides=(c, s, s),
        baselines=0.0,
        target=targets,
        perturbations_per_eval=64,
    )


def _kernel_shap(model, inputs, targets, cfg):
    """Lundberg & Lee 2017: Shapley values of `patch` x `patch` superpixels, estimated by a
    weighted linear fit over `samples` random coalitions (the rest blacked out) per image."""
    from captum.attr import KernelShap

    return _one_by_one(KernelShap(model), inputs, targets, cfg)


def _lime(model, inputs, targets, cfg):
    """Ribeiro et al. 2016: a sparse linear model (Lasso) of the logit over `samples` random
    on/off superpixel masks, weighted by their closeness to the input."""
    from captum.attr import Lime

    return _one_by_one(Lime(model), inputs, targets, cfg)


def _one_by_one(explainer, inputs, targets, cfg):
    """A surrogate model fitted per image, as Captum recommends for LIME and KernelSHAP.

    Superpixels that are black already (equal to the baseline) cannot change the output when
    "removed": their Shapley value is exactly 0 (the dummy axiom). Fitted one by one they soak
    up the sampling noise (40 % of KernelSHAP's mass on digits at 200 samples), so they are one
    feature together, whose attribution is set to 0, and the samples go to the rest."""
    cells = superpixels(inputs.shape[1:], patch_size(cfg, *inputs.shape[2:]))
    out = torch.zeros_like(inputs)
    for i in range(len(inputs)):
        x = inputs[i : i + 1]
        bright = torch.zeros(int(cells.max()) + 1).scatter_reduce(
            0, cells.flatten(), x.detach().abs().flatten(), "amax"
        )
        live = bright > 0
        if not live.any():
            continue  # a black image: nothing to attribute
        ids = torch.where(live, live.cumsum(0) - 1, int(live.sum()))[cells]  # black: the last
        out[i] = explainer.attribute(
            x,
            baselines=0.0,
            target=int(targets[i]),
            feature_mask=ids,
            n_samples=cfg.samples,
            perturbations_per_eval=64,
        )[0] * (ids[0] < live.sum())
    return out


integrated_gradients = Method(True, _integrated_gradients)
saliency = Method(True, _saliency)
occlusion = Method(False, _occlusion)
kernel_shap = Method(False, _kernel_shap)
lime = Method(False, _lime)


def patch_size(cfg: ExplainConfig, h: int, w: int) -> int:
    """The occlusion window and superpixel side in pixels: `cfg.patch`, else an eighth of the
    shorter side (4 px on 28x28 MNIST, 1 px on 8x8 digits)."""
    return cfg.patch or max(1, round(min(h, w) / 8))


def superpixels(shape: tuple[int, int, int], patch: int) -> torch.Tensor:
    """A (1, C, H, W) feature mask: square cells of `patch` pixels, numbered row by row; all
    channels of a pixel are one feature."""
    c, h, w = shape
    cols = math.ceil(w / patch)
    rows = torch.arange(h).div(patch, rounding_mode="floor")[:, None]
    ids = rows * cols + torch.arange(w).div(patch, rounding_mode="floor")[None, :]
    return ids.expand(1, c, h, w).contiguous()


def attribute(
    model: nn.Module,
    method: Method,
    images: np.ndarray,
    targets: np.ndarray,
    cfg: ExplainConfig,
    chunk: int = 16,
    on_chunk: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Attributions of `images` (N, C, H, W, any numeric dtype, raw pixels 0..255) toward
    `targets` (N class indices): (N, H, W) float32, signed, summed over channels. Computed
    `chunk` images at a time (bounded memory; `on_chunk(done)` after each). Raises ValueError
    when `method` needs gradients and the model has none (an ONNX model)."""
    if method.gradients and not differentiable(model):
        raise ValueError("this method needs gradients, and an ONNX model has none")
    model.eval()
    out = []
    for start in range(0, len(images), chunk):
        x = torch.as_tensor(np.asarray(images[start : start + chunk], np.float32))
        x.requires_grad_(method.gradients)
        y = torch.as_tensor(np.asarray(targets[start : start + chunk], np.int64))
        out.append(method.attribute(model, x, y, cfg).detach().sum(1).float().numpy())
        if on_chunk:
            on_chunk(start + len(x))
    return np.concatenate(out) if out else np.zeros((0, *images.shape[2:]), np.float32)


def differentiable(model: nn.Module) -> bool:
    """Whether gradients flow through `model` (an ONNX Runtime model has none)."""
    return getattr(model, "differentiable", True)


def mass_in(maps: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per image, the share of absolute attribution inside `region` (H, W bool): 0..1."""
    total = np.abs(maps).sum((1, 2))
    inside = np.abs(maps)[:, region].sum(1)
    return inside / np.maximum(total, 1e-12)
