"""Images to score: a folder of image files or an .npy array, checked up front and then read a
batch at a time, so scoring a set far larger than memory holds one batch.

Both go through the model's input contract (`contract.py`): an .npy holds N x C x H x W (or
N x H x W) uint8 pixels or numbers on the same 0..255 scale, anything else (empty, NaN/Inf,
outside 0..255, scaled to 0..1) is refused before any scoring; folder images are decoded as at
ingest. Every file Pillow reads is an image; other files (a README) are listed as skipped, hidden
ones ignored; an image that cannot be decoded fails the run naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.contract import InputContract, float_batches
from pipeline.data.images import BadImage, NotAnImage, hidden, probe
from pipeline.errors import DataError

BATCH = 1024


@dataclass(frozen=True)
class Inputs:
    names: list[str]
    batches: Callable[[], Iterator[np.ndarray]]  # float32 N x C x H x W, 0..255 scale
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it is not scored


def open_inputs(path: Path, contract: InputContract) -> Inputs:
    """Raises DataError naming the file and the problem."""
    path = Path(path)
    if path.suffix == ".npy":
        return _array(path, contract)
    if path.is_dir():
        return _folder(path, contract)
    raise DataError(f"{path}: give a folder of images or an .npy file")


def _array(path: Path, contract: InputContract) -> Inputs:
    try:
        images = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npy array ({exc})") from None
    try:
        images = contract.check(images, str(path))
    except ValueError as exc:
        raise DataError(str(exc)) from None
    names = [f"{path.name}[{i}]" for i in range(len(images))]
    return Inputs(names, lambda: float_batches(images, BATCH))


def _folder(folder: Path, contract: InputContract) -> Inputs:
    files, skipped = [], {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if any(hidden(part) for part in path.relative_to(folder).parts):
            continue
        if path.is_symlink():  # never followed, as at ingest: it could read any file
            skipped[name] = f"a link (to {os.readlink(path)}): links are never read"
            continue
        if not path.is_file():
            continue
        try:
            probe(path, *contract.pixel_limit(served=True))
            files.append(path)
        except NotAnImage as exc:
            skipped[name] = str(exc)
        except BadImage as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
    if not files:
        raise DataError(f"{folder} has no images (files Pillow reads; hidden ones are ignored)")

    def read(file: Path) -> np.ndarray:
        try:
            return contract.decode(file, served=True)
        except BadImage as exc:
            raise DataError(f"cannot read image {file}: {exc}") from None

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(files), BATCH):
            yield np.stack([read(f) for f in files[start : start + BATCH]]).astype(np.float32)

    return Inputs([str(p.relative_to(folder)) for p in files], batches, skipped)
