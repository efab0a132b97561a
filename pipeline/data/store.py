"""The on-disk dataset format in `data/`: one .npy per array plus meta.json.

Few large files keep DVC fast, and writing is deterministic (same arrays -> same bytes -> same md5
in data.dvc), so regenerating the default dataset on a fresh clone reproduces the committed hash.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, C, H, W)
    labels: np.ndarray  # (N,) integer class ids


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: list[str]
    train: Split
    test: Split
    source: str = ""
    recipe: dict = field(default_factory=dict)  # the settings that made it (sources.recipe)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def meta(self) -> dict:
        return {
            "name": self.name,
            "classes": self.classes,
            "shape": list(self.shape),
            "dtype": str(self.train.images.dtype),
            "source": self.source,
            "recipe": self.recipe,
            "splits": {s: int(len(getattr(self, s).labels)) for s in SPLITS},
        }


def write_dataset(ds: Dataset, root: Path) -> None:
    """Replace `root` with `ds` atomically: a crash leaves the old data or the new, never a mix.

    Callers hold the data lock (`pipeline.data.materialize`), so any temporary folder found
    beside `root` is a killed writer's leftover and is removed first."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    for stale in root.parent.glob(f".{root.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for split in SPLITS:
            part = getattr(ds, split)
            np.save(tmp / f"{split}_images.npy", np.ascontiguousarray(part.images))
            np.save(tmp / f"{split}_labels.npy", np.ascontiguousarray(part.labels, dtype=np.int64))
        (tmp / "meta.json").write_text(json.dumps(ds.meta(), indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = root.with_name(f".{root.name}-old")
        if root.exists():
            shutil.rmtree(old, ignore_errors=True)
            root.rename(old)
        tmp.rename(root)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_meta(root: Path) -> dict:
    path = Path(root) / "meta.json"
    if not path.exists():
        raise DataError(f"{path} is missing; run `pipeline data pull` to materialize the dataset")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON ({exc}); restore it with `dvc checkout --force data.dvc`"
        ) from None


def read_dataset(root: Path, mmap: bool = False) -> Dataset:
    """Load `data/` as written by `write_dataset`; shape/dtype checks are validation's job.

    `mmap` maps the image files read-only instead of reading them, for splits bigger than memory.
    """
    root = Path(root)
    meta = read_meta(root)
    splits = {}
    for split in SPLITS:
        images = _load_array(root / f"{split}_images.npy", mmap)
        labels = _load_array(root / f"{split}_labels.npy")
        if len(images) != len(labels):
            raise DataError(
                f"{root}/{split}: {len(images)} images but {len(labels)} labels; restore the "
                "data with `dvc checkout --force data.dvc` or re-run `pipeline data pull`"
            )
        splits[split] = Split(images, labels)
    return Dataset(
        meta.get("name", "?"),
        list(meta.get("classes", [])),
        splits["train"],
        splits["test"],
        meta.get("source", ""),
        meta.get("recipe", {}),
    )


def _load_array(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise DataError(f"{path} is missing; run `pipeline data pull` or `dvc pull`") from None
    except ValueError as exc:
        raise DataError(f"{path} cannot be read as a plain numpy array: {exc}") from None
