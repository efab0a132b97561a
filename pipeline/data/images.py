"""One image file to the dataset's pixels: probed for its mode and size, decoded (downscaled
while decoding where the format allows, Pillow's draft mode), converted to the dataset's mode
and brought to its size by the resize policy.

Pure functions of the file's bytes and the settings, so any number of worker processes write the
same bytes. High-bit grayscale (16-bit PNG/TIFF, 32-bit integer TIFF) is scaled, not clipped,
into 0..255 by the dataset's bit depth; float images are refused: they have no fixed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# Pillow's modes for one channel of more than 8 bits; `convert("L")` would clip them at 255.
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
GRAY_MODES = ("L", "1", "LA", *HIGH_BIT_MODES)
BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)
RESIZE_POLICIES = ("crop", "squash", "pad")


class BadImage(Exception):
    """A file that cannot be an image of this dataset; the message says why."""


@dataclass(frozen=True)
class Probe:
    """What the header (and, for high-bit images, the pixel range) says about a file."""

    gray: bool
    size: tuple[int, int]  # width, height
    brightest: int = 0  # high-bit images only: their largest value


def probe(path: Path) -> Probe:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode == "F":
                raise BadImage(
                    "a floating-point image has no fixed range to scale into 0..255; save it as "
                    "an 8- or 16-bit integer image"
                )
            brightest = 0
            if im.mode in HIGH_BIT_MODES:
                low, brightest = im.getextrema()
                if low < 0:
                    raise BadImage(f"negative pixel values ({low})")
            return Probe(im.mode in GRAY_MODES, im.size, int(brightest))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(str(exc) or type(exc).__name__) from None


def bit_depth(brightest: int) -> int:
    """The smallest of 8/10/12/14/16/24/32 bits that holds the dataset's brightest high-bit
    value. One depth for the whole dataset keeps relative brightness between images (a 12-bit
    camera's files in 16-bit PNGs scale by 4096, not 65536)."""
    return next(d for d in BIT_DEPTHS if brightest < 2**d)


def decode(
    path: Path, gray: bool, size: tuple[int, int] | None, policy: str, depth: int
) -> np.ndarray:
    """The file as uint8 C x H x W in the dataset's mode; `size` (width, height) None keeps
    the file's own size. Raises BadImage for a file that does not decode."""
    from PIL import Image

    mode = "L" if gray else "RGB"
    try:
        with Image.open(path) as im:
            if size is not None and im.format == "JPEG":
                im.draft(mode, _needed(im.size, size, policy))  # decode at 1/2, 1/4, 1/8 scale
            im.load()
            pic = _to_mode(im, mode, depth)
            if size is not None and pic.size != size:
                pic = _resize(pic, size, policy)
            pixels = np.asarray(pic, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(str(exc) or type(exc).__name__) from None
    return pixels[None] if gray else pixels.transpose(2, 0, 1)


def _needed(have: tuple[int, int], want: tuple[int, int], policy: str) -> tuple[int, int]:
    """The smallest decoded size the policy can still resize down from without upscaling."""
    (w, h), (tw, th) = have, want
    if policy == "squash":
        return tw, th
    scale = max(tw / w, th / h) if policy == "crop" else min(tw / w, th / h)
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def _to_mode(im, mode: str, depth: int):
    from PIL import Image

    if im.mode in HIGH_BIT_MODES:
        values = np.asarray(im, dtype=np.int64) >> (depth - 8)
        im = Image.fromarray(values.astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # palette transparency: through RGBA, as Pillow advises
    return im if im.mode == mode else im.convert(mode)


def _resize(pic, size: tuple[int, int], policy: str):
    """crop: shorter side to size, center crop (the ImageNet convention); squash: straight to
    size, aspect ratio lost; pad: longer side to size, centered on black."""
    from PIL import Image, ImageOps

    if policy == "crop":
        return ImageOps.fit(pic, size, Image.Resampling.BILINEAR)
    if policy == "pad":
        return ImageOps.pad(pic, size, Image.Resampling.BILINEAR, color=0)
    return pic.resize(size, Image.Resampling.BILINEAR)
