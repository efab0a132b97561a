"""Images to score: a folder of image files or an .npy array, checked and brought to the model's
input shape on the pixel scale it was trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.sources import IMAGE_SUFFIXES
from pipeline.errors import DataError


def load_inputs(path: Path, shape: list[int]) -> tuple[list[str], np.ndarray]:
    """(names, float32 N x C x H x W in the 0-255 pixel scale the model was trained on).

    An .npy holds N x C x H x W or N x H x W of uint8 pixels, or of numbers on the same 0..255
    scale; anything else (empty, NaN/Inf, outside 0..255, scaled to 0..1) is refused. Folder
    images are converted to the model's channel count and resized to its height and width."""
    path = Path(path)
    c, h, w = shape
    if path.suffix == ".npy":
        try:
            images = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path} is not a readable .npy array ({exc})") from None
        if images.ndim == 3 and c == 1:
            images = images[:, None]
        if images.ndim != 4 or list(images.shape[1:]) != [c, h, w]:
            raise DataError(
                f"{path} holds images of shape {list(images.shape[1:])}; the model takes "
                f"{[c, h, w]} (N x C x H x W, or N x H x W for one channel)"
            )
        return [f"{path.name}[{i}]" for i in range(len(images))], _pixels(path, images)
    if path.is_dir():
        return _read_folder(path, c, h, w)
    raise DataError(f"{path}: give a folder of images or an .npy file")


def _pixels(path: Path, images: np.ndarray) -> np.ndarray:
    """The array as float32 pixels, after checking it holds what the model was trained on."""
    if len(images) == 0:
        raise DataError(f"{path} holds no images (shape {list(images.shape)})")
    if images.dtype == np.uint8:
        return images.astype(np.float32)
    is_float = np.issubdtype(images.dtype, np.floating)
    if not (is_float or np.issubdtype(images.dtype, np.integer)):
        raise DataError(f"{path} holds {images.dtype} values; give uint8 pixels (0..255)")
    if is_float:
        bad = ~np.isfinite(images)
        if bad.any():
            first = int(np.argmax(bad.reshape(len(images), -1).any(axis=1)))
            raise DataError(
                f"{path} has {int(bad.sum())} NaN/Inf values (first in image {first}); "
                "the model cannot score them"
            )
    low, high = images.min(), images.max()
    if low < 0 or high > 255:
        raise DataError(
            f"{path} has values {low:g}..{high:g}; the model takes pixels in 0..255 "
            "(uint8, or numbers on that scale)"
        )
    if is_float and high <= 1 and (images != np.round(images)).any():
        raise DataError(
            f"{path} looks scaled to 0..1 (values {low:g}..{high:g}); the model takes pixels in "
            "0..255: multiply by 255 or save the array as uint8"
        )
    return images.astype(np.float32)


def _read_folder(folder: Path, c: int, h: int, w: int) -> tuple[list[str], np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    out = np.empty((len(files), c, h, w), np.float32)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as img:
                img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {file}: {exc}") from None
        out[i] = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
    return [str(p.relative_to(folder)) for p in files], out
