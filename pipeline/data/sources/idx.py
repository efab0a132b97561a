"""mnist, fashion_mnist: the IDX files under `source_dir/<MNIST|FashionMNIST>/raw/`, downloaded
with torchvision first when allowed and missing."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.sources.common import in_memory, need_dir, raw_files
from pipeline.data.store import DataError, Dataset, Split

FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's class names


def recipe(name: str, data: DataConfig) -> dict:
    return raw_files(name, data, f"{FOLDERS[name]}/raw")


def load(name: str, data: DataConfig) -> Dataset:
    """uint8 (N, 1, 28, 28) images; the dataset's own train / test split."""
    return mnist_like(name, need_dir(name, data.source_dir), data.download)


def mnist_like(name: str, root: Path, download: bool) -> Dataset:
    """MNIST / Fashion-MNIST from their IDX files under `root/<MNIST|FashionMNIST>/raw/`."""
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True"
            raise DataError(
                f"{name}: raw IDX files not found under {root / cls.__name__ / 'raw'} and "
                f"download {'failed' if download else 'is off'} ({exc}); put "
                "train-images-idx3-ubyte etc. there or allow data.download"
            ) from None
        splits.append(Split(ds.data.numpy()[:, None], ds.targets.numpy().astype(np.int64)))
    return Dataset(name, list(cls.classes), splits[0], splits[1], f"torchvision.{cls.__name__}")


MNIST = in_memory(partial(load, "mnist"), partial(recipe, "mnist"))
FASHION_MNIST = in_memory(partial(load, "fashion_mnist"), partial(recipe, "fashion_mnist"))
