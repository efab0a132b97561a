"""Batched inference: one pass over images (resident or memory-mapped), a batch at a time, so
memory holds one batch of float pixels, never the whole split."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from pipeline.data.store import release

BATCH_SIZE = 256  # images per forward pass: 64x64 photos x 1024 held ~0.5 GB of activations


@torch.no_grad()
def batched(
    model: nn.Module,
    images: np.ndarray,
    head: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = BATCH_SIZE,
) -> np.ndarray:
    """`head(logits)` of every image, concatenated in order; the model is put in eval mode."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], dtype=np.float32)
        outputs.append(head(model(torch.from_numpy(batch))))
        release(images)  # a memory-mapped split: keep one batch resident, not the file
    return torch.cat(outputs).numpy()


def predict(model: nn.Module, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """The predicted class index of every image."""
    return batched(model, images, lambda logits: logits.argmax(1), batch_size)


def probabilities(
    model: nn.Module, images: np.ndarray, temperature: float = 1.0, batch_size: int = BATCH_SIZE
) -> np.ndarray:
    """Every image's class probabilities, N x classes: softmax(logits / temperature), the
    temperature fitted by evaluate (`training.calibration`; 1: the plain softmax)."""
    return batched(model, images, lambda logits: (logits / temperature).softmax(1), batch_size)


def logits(model: nn.Module, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Every image's logits, N x classes (float32)."""
    return batched(model, images, lambda out: out.float(), batch_size)


def logits_and_features(
    model: nn.Module, images: np.ndarray, batch_size: int = BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray | None]:
    """Every image's logits (N x classes, float32) and penultimate features (N x D float32: the
    input of the model's last linear layer, where its classifier head begins), from one pass;
    features None for a model without a linear layer (an ONNX model runs as one opaque module).
    """
    last = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
    if last is None:
        return logits(model, images, batch_size), None
    seen: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda _m, args, _out: seen.append(args[0].flatten(1)))
    try:
        out = logits(model, images, batch_size)
    finally:
        hook.remove()
    return out, torch.cat(seen).float().numpy()
