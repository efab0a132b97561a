"""What the prediction log keeps of an image: a compact profile that monitoring compares with
the training data's, never the image itself."""

from __future__ import annotations

import functools

import numpy as np

EMBED_DIMS = 8


def profile(pixels: np.ndarray, features: np.ndarray | None) -> dict[str, np.ndarray | None]:
    """Of float32 N x C x H x W `pixels` (0..255, as the model's input contract made them):
    `mean` and `contrast` (standard deviation) per channel, N x C; `embedding`, N x EMBED_DIMS:
    the model's penultimate `features` (N x D) through a fixed random projection, which keeps
    distances up to a small factor (Johnson-Lindenstrauss) and is the same for every model of D
    features, so reference and live rows compare; None without features."""
    flat = pixels.reshape(len(pixels), pixels.shape[1], -1)
    embedding = None if features is None else features @ _projection(features.shape[1])
    return {"mean": flat.mean(2), "contrast": flat.std(2), "embedding": embedding}


@functools.cache
def _projection(dims: int) -> np.ndarray:
    """dims x EMBED_DIMS Gaussian, seeded by `dims`, scaled so squared norms are kept on
    average."""
    rng = np.random.default_rng(dims)
    return (rng.standard_normal((dims, EMBED_DIMS)) / np.sqrt(EMBED_DIMS)).astype(np.float32)
