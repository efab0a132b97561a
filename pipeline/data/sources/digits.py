"""digits: scikit-learn's bundled 8x8 handwritten digits (1,797 images), the offline default."""

from __future__ import annotations

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.sources.common import from_mask, in_memory, stratified_split
from pipeline.data.store import Dataset


def recipe(data: DataConfig) -> dict:
    return {"dataset": "digits", "test_fraction": data.test_fraction}


def load(data: DataConfig) -> Dataset:
    """uint8 (N, 1, 8, 8) images, 0..16 intensities scaled to 0..255, stratified split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train, test = from_mask(images, labels, stratified_split(labels, data.test_fraction))
    return Dataset("digits", [str(i) for i in range(10)], train, test, "sklearn.load_digits")


SOURCE = in_memory(load, recipe)
