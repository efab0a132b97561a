"""The on-disk dataset format in `data/`: one .npy per array plus meta.json.

Few large files keep DVC fast, and writing is deterministic (same arrays -> same bytes -> same md5
in data.dvc), so regenerating the default dataset on a fresh clone reproduces the committed hash.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
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
    contract: dict = field(default_factory=dict)  # how files become its pixels (contract.py)

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
            **({"contract": self.contract} if self.contract else {}),
            "splits": {s: int(len(getattr(self, s).labels)) for s in SPLITS},
        }


class DatasetWriter:
    """Writes a new data/ beside the old one and swaps it in on `commit`: a crash leaves the old
    data or the new, never a mix.

    Images are appended to each split's .npy file in order, a block at a time, so writing a
    dataset never holds it in memory; the bytes are those `np.save` would write. Callers hold
    the data lock (`pipeline.data.materialize`), so a temporary folder found beside `root` is a
    killed writer's leftover and is removed first."""

    def __init__(self, root: Path, shape: tuple[int, int, int], counts: dict[str, int]):
        self.root, self.counts = Path(root), counts
        self.root.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.root.parent.glob(f".{self.root.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.root.name}-", dir=self.root.parent))
        self.files, self.labels = {}, {split: [] for split in SPLITS}
        for split in SPLITS:
            self.files[split] = open(self.tmp / f"{split}_images.npy", "wb")  # noqa: SIM115
            header = {"descr": "|u1", "fortran_order": False, "shape": (counts[split], *shape)}
            np.lib.format.write_array_header_1_0(self.files[split], header)

    def append(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        self.files[split].write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
        self.labels[split].append(np.asarray(labels, dtype=np.int64))

    def commit(self, meta: dict) -> None:
        for split in SPLITS:
            labels = np.concatenate([np.zeros(0, np.int64), *self.labels[split]])
            if len(labels) != self.counts[split]:
                due = self.counts[split]
                raise RuntimeError(f"{split}: {len(labels)} images written, {due} due")
            np.save(self.tmp / f"{split}_labels.npy", labels)
            self.files[split].close()
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in self.tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = self.root.with_name(f".{self.root.name}-old")
        if self.root.exists():
            shutil.rmtree(old, ignore_errors=True)
            self.root.rename(old)
        self.tmp.rename(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.files.values():
            handle.close()
        shutil.rmtree(self.tmp, ignore_errors=True)  # gone after a commit; a failed write's


def write_dataset(ds: Dataset, root: Path, block: int = 4096) -> None:
    """Replace `root` with `ds` atomically (see `DatasetWriter`), copying a block at a time."""
    counts = {split: len(getattr(ds, split).labels) for split in SPLITS}
    with DatasetWriter(root, ds.shape, counts) as writer:
        for split in SPLITS:
            part = getattr(ds, split)
            for start in range(0, counts[split], block):
                end = start + block
                writer.append(split, part.images[start:end], part.labels[start:end])
        writer.commit(ds.meta())


def release(array: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process's resident memory (they stay in the
    page cache), so reading a split a chunk at a time holds one chunk, not the file."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None:
        mapping.madvise(mmap.MADV_DONTNEED)


def chunks(array: np.ndarray, size: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """(start, rows as an in-memory copy) for every block of `size` rows, in order."""
    for start in range(0, len(array), size):
        yield start, np.array(array[start : start + size])
        release(array)


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
        meta.get("contract", {}),
    )


def _load_array(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise DataError(f"{path} is missing; run `pipeline data pull` or `dvc pull`") from None
    except ValueError as exc:
        raise DataError(f"{path} cannot be read as a plain numpy array: {exc}") from None
