"""Dataset sources: each writes a `Dataset` of uint8 (N, C, H, W) images with a fixed split.

Which sources exist, and where each one's code lives, is `choices.DATASETS`; each entry is a
`common.Source` (recipe, write, and load for those held in memory). `digits` ships with
scikit-learn (the offline default); `mnist`, `fashion_mnist` and `cifar10` read the dataset's own
raw files from `source_dir`; `imagefolder` streams a folder of photos to disk.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import choices
from pipeline.config import DataConfig
from pipeline.data.sources.common import Source
from pipeline.data.store import DataError, Dataset


def source(name: str) -> Source:
    """The `Source` of dataset `name`; DataError naming the known ones otherwise."""
    if name not in choices.DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(choices.DATASETS)}")
    return choices.load(choices.DATASETS, name)


def recipe(name: str, data: DataConfig) -> dict:
    """The settings and the source content that determine a dataset's bytes.

    Stored in meta.json, so a pull with other settings, or from a source whose files changed,
    knows data/ is not what it asks for."""
    return source(name).recipe(data)


def write_source(name: str, data: DataConfig, data_dir: Path, made_by: dict | None = None):
    """Write dataset `name` from its source to `data_dir` (replacing what is there); `made_by`:
    its `recipe`, when the caller has it already (a photo folder's is one read of the folder)."""
    source(name).write(data, data_dir, made_by)


def load_source(name: str, data: DataConfig) -> Dataset:
    """A built-in dataset, whole in memory (CIFAR-10, the largest, is 180 MB)."""
    found = source(name)
    if found.load is None:
        raise DataError(f"dataset {name!r} is not held in memory; `write_source` writes it")
    return found.load(data)
