"""What every dataset source is and shares: the `Source` entry (`choices.DATASETS` names where
each lives), the source folder check and the stratified split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.store import DataError, Dataset, Split, write_dataset


@dataclass(frozen=True)
class Source:
    """One dataset source.

    recipe(data) -> dict: the settings and source content that determine the dataset's bytes
        (stored in meta.json; a pull with another recipe writes a new version).
    write(data, data_dir, made_by): write the dataset to `data_dir` (replacing what is there);
        `made_by` is its recipe when the caller has it (None: the source works it out).
    load(data) -> Dataset: the whole dataset in memory, for the built-in sets that fit (None for
        a source that only streams to disk).
    """

    recipe: Callable[[DataConfig], dict]
    write: Callable[[DataConfig, Path, dict | None], None]
    load: Callable[[DataConfig], Dataset] | None = None


def in_memory(load: Callable[[DataConfig], Dataset], recipe: Callable[[DataConfig], dict]):
    """A `Source` for a dataset of fixed-size 8-bit arrays that fits in memory (CIFAR-10, the
    largest built-in, is 180 MB): loaded whole, then written with its contract."""
    from pipeline.data.contract import for_dataset

    def write(data: DataConfig, data_dir: Path, made_by: dict | None) -> None:
        ds = load(data)
        contract = for_dataset(ds.shape, ds.classes, data, None, 8)  # arrays: fixed size, 8-bit
        made_by = recipe(data)  # always after loading: a download may have brought the files
        write_dataset(replace(ds, recipe=made_by, contract=contract.to_dict()), data_dir)

    return Source(recipe=recipe, write=write, load=load)


def need_dir(name: str, source_dir: Path | str | None) -> Path:
    """`data.source_dir` as a path; DataError naming the key when it is not set or not a
    folder."""
    if source_dir is None:
        raise DataError(f"dataset {name!r} needs data.source_dir (where its raw files live)")
    if not Path(source_dir).is_dir():
        raise DataError(f"{name}: data.source_dir {source_dir} is not a folder; set it to one")
    return Path(source_dir)


def download_dir(data: DataConfig) -> Path:
    """Where downloads go: `data.download_dir`, else `.cache/datasets` in the project
    (git-ignored); never a user's `source_dir`."""
    from pipeline.settings import Settings

    return Path(data.download_dir or Settings.from_env().root / ".cache" / "datasets")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean test mask (N,) with the same class proportions in both splits.

    Uses the legacy RandomState on purpose: its stream is frozen across numpy versions, so the
    split (and so the md5 in data.dvc) never changes under an upgrade.
    """
    rng = np.random.RandomState(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        is_test[idx[: max(1, round(len(idx) * test_fraction))]] = True
    return is_test


def from_mask(images, labels, is_test) -> tuple[Split, Split]:
    """(train, test) splits of `images` (N, C, H, W) and `labels` (N,) by the boolean mask."""
    return Split(images[~is_test], labels[~is_test]), Split(images[is_test], labels[is_test])
