"""Images to score: a folder of image files or an .npy array, checked up front and then read a
batch at a time, so scoring a set far larger than memory holds one batch.

An .npy holds N x C x H x W or N x H x W of uint8 pixels, or of numbers on the same 0..255 scale;
anything else (empty, NaN/Inf, outside 0..255, scaled to 0..1) is refused before any scoring.
Folder images are converted to the model's channel count and resized to its height and width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.images import IMAGE_SUFFIXES, BadImage, bit_depth, decode, probe
from pipeline.data.store import chunks
from pipeline.errors import DataError

BATCH = 1024


@dataclass(frozen=True)
class Inputs:
    names: list[str]
    batches: Callable[[], Iterator[np.ndarray]]  # float32 N x C x H x W, 0..255 scale


def open_inputs(path: Path, shape: tuple[int, int, int]) -> Inputs:
    path = Path(path)
    if path.suffix == ".npy":
        return _array(path, shape)
    if path.is_dir():
        return _folder(path, shape)
    raise DataError(f"{path}: give a folder of images or an .npy file")


def _array(path: Path, shape: tuple[int, int, int]) -> Inputs:
    c, h, w = shape
    try:
        images = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npy array ({exc})") from None
    if images.ndim == 3 and c == 1:
        images = images[:, None]
    if images.ndim != 4 or list(images.shape[1:]) != [c, h, w]:
        raise DataError(
            f"{path} holds images of shape {list(images.shape[1:])}; the model takes "
            f"{[c, h, w]} (N x C x H x W, or N x H x W for one channel)"
        )
    _check_pixels(path, images)

    def batches() -> Iterator[np.ndarray]:
        for _, chunk in chunks(images, BATCH):
            yield chunk.astype(np.float32)

    return Inputs([f"{path.name}[{i}]" for i in range(len(images))], batches)


def _check_pixels(path: Path, images: np.ndarray) -> None:
    """Refuse what the model was not trained on, reading the array a chunk at a time."""
    if len(images) == 0:
        raise DataError(f"{path} holds no images (shape {list(images.shape)})")
    if images.dtype == np.uint8:
        return
    is_float = np.issubdtype(images.dtype, np.floating)
    if not (is_float or np.issubdtype(images.dtype, np.integer)):
        raise DataError(f"{path} holds {images.dtype} values; give uint8 pixels (0..255)")
    low, high, bad, first, fractional = np.inf, -np.inf, 0, None, False
    for start, chunk in chunks(images, BATCH):
        if is_float:
            nonfinite = ~np.isfinite(chunk)
            if nonfinite.any() and first is None:
                first = start + int(np.argmax(nonfinite.reshape(len(chunk), -1).any(axis=1)))
            bad += int(nonfinite.sum())
            chunk = chunk[~nonfinite]
            fractional = fractional or bool((chunk != np.round(chunk)).any())
        if chunk.size:
            low, high = min(low, chunk.min()), max(high, chunk.max())
    if bad:
        raise DataError(
            f"{path} has {bad} NaN/Inf values (first in image {first}); the model cannot score them"
        )
    if low < 0 or high > 255:
        raise DataError(
            f"{path} has values {low:g}..{high:g}; the model takes pixels in 0..255 "
            "(uint8, or numbers on that scale)"
        )
    if is_float and high <= 1 and fractional:
        raise DataError(
            f"{path} looks scaled to 0..1 (values {low:g}..{high:g}); the model takes pixels in "
            "0..255: multiply by 255 or save the array as uint8"
        )


def _folder(folder: Path, shape: tuple[int, int, int]) -> Inputs:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    c, h, w = shape

    def read(file: Path) -> np.ndarray:
        try:
            depth = bit_depth(probe(file).brightest)
            return decode(file, c == 1, (w, h), "squash", depth)
        except BadImage as exc:
            raise DataError(f"cannot read image {file}: {exc}") from None

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(files), BATCH):
            yield np.stack([read(f) for f in files[start : start + BATCH]]).astype(np.float32)

    return Inputs([str(p.relative_to(folder)) for p in files], batches)
