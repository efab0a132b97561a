"""cifar10: the python batches in `source_dir/cifar-10-batches-py/`, downloaded with
torchvision first when allowed and missing. The batches are pickles: a restricted unpickler loads
them without executing anything else."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.sources.common import in_memory, need_dir, raw_files
from pipeline.data.store import DataError, Dataset, Split

FOLDER = "cifar-10-batches-py"


def recipe(data: DataConfig) -> dict:
    return raw_files("cifar10", data, FOLDER)


def load(data: DataConfig) -> Dataset:
    """uint8 (N, 3, 32, 32) images; the dataset's own train / test split."""
    return cifar10(need_dir("cifar10", data.source_dir), data.download)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what the official CIFAR-10 batches hold (dicts, lists, bytes, str, numbers and
    numpy arrays) and refuses every other global, so a crafted file cannot run code."""

    ALLOWED = {
        (module, name)
        for core in ("numpy.core", "numpy._core")
        for module, name in (
            (f"{core}.multiarray", "_reconstruct"),
            (f"{core}.multiarray", "scalar"),
            (f"{core}.numeric", "_frombuffer"),
        )
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only dicts, lists, "
                "bytes, strings, numbers and numpy arrays"
            )
        return super().find_class(module, name)


def cifar10(root: Path, download: bool) -> Dataset:
    """CIFAR-10 from the python batches in `root/cifar-10-batches-py/`.

    The batches are pickles; `_BatchUnpickler` loads them without executing anything else.
    """
    folder = root / FOLDER
    if not folder.exists() and download:
        from torchvision import datasets

        try:
            datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
            raise DataError(f"cifar10: download to {root} failed ({exc})") from None
    if not folder.exists():
        raise DataError(f"cifar10: {folder} not found; put the python batches there")

    def batch(file: str) -> dict:
        path = folder / file
        try:
            with open(path, "rb") as fh:
                loaded = _BatchUnpickler(fh, encoding="latin1").load()
        except FileNotFoundError:
            raise DataError(f"cifar10: {path} is missing") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise DataError(
                f"cifar10: {path} is not an official CIFAR-10 python batch ({exc}); "
                "replace it with the file from cifar-10-python.tar.gz"
            ) from None
        if not isinstance(loaded, dict):
            raise DataError(f"cifar10: {path} holds a {type(loaded).__name__}, not a batch dict")
        return loaded

    def split(files: list[str]) -> Split:
        parts = [batch(f) for f in files]
        images = np.concatenate([np.asarray(p["data"], np.uint8) for p in parts])
        labels = np.concatenate([np.asarray(p["labels"], np.int64) for p in parts])
        return Split(images.reshape(-1, 3, 32, 32), labels)

    classes = list(batch("batches.meta")["label_names"])
    train = split([f"data_batch_{i}" for i in range(1, 6)])
    return Dataset("cifar10", classes, train, split(["test_batch"]), "cifar-10-python")


SOURCE = in_memory(load, recipe)
