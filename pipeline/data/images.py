"""Pillow primitives for one image file, as a viewer shows it: EXIF orientation applied, a pixel
limit checked before anything is decoded, high-bit grayscale scaled into 0..255, transparency
composited onto a background, and the resize policies. `contract.InputContract.decode` puts them
together; nothing else decodes images.

Pure functions of the file's bytes and the settings, so any number of worker processes write the
same bytes. Float images are refused: they have no fixed range.
"""

from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

# Pillow's modes for one channel of more than 8 bits; `convert("L")` would clip them at 255.
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
GRAY_MODES = ("L", "1", "LA", "La", *HIGH_BIT_MODES)
BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# Pillow refuses images over twice its own limit before we could look at them.
PILLOW_HARD_LIMIT = 2 * 89_478_485
INGEST_LIMIT = "data.max_image_pixels"


class BadImage(Exception):
    """An image file that cannot be decoded (corrupt, truncated, too large, float); the message
    says why. `data.on_bad_image` decides whether it fails a pull or is skipped."""


class NotAnImage(BadImage):
    """A file Pillow does not recognize whose suffix is not an image format's (README,
    LICENSE, notes.pdf, Thumbs.db): always left out and listed, never a failure."""


def hidden(name: str) -> bool:
    """Dot-files and folders (.DS_Store, .ipynb_checkpoints) and macOS archive debris."""
    return name.startswith(".") or name == "__MACOSX"


@cache
def image_suffixes() -> frozenset[str]:
    """Every file suffix of a format Pillow reads (.png, .jpg, .webp, .tif, .ppm, ...; not
    .pdf, which it only writes)."""
    from PIL import Image

    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass(frozen=True)
class Probe:
    """What the header (and, for high-bit images, the pixel range) says about a file."""

    gray: bool
    size: tuple[int, int]  # width, height as shown: after the EXIF orientation
    brightest: int = 0  # high-bit images only: their largest value


def probe(path: Path | str, max_pixels: int, limit: str = INGEST_LIMIT) -> Probe:
    """Raises NotAnImage for a file that is no image, BadImage for one that cannot be used
    (over `max_pixels`, set by the setting named `limit`)."""
    with _opened(path, max_pixels, limit) as im:
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
        w, h = im.size
        size = (h, w) if _orientation(im) in ROTATED else (w, h)
        return Probe(im.mode in GRAY_MODES, size, int(brightest))


def bit_depth(brightest: int) -> int:
    """The smallest of 8/10/12/14/16/24/32 bits that holds the dataset's brightest high-bit
    value. One depth for the whole dataset keeps relative brightness between images (a 12-bit
    camera's files in 16-bit PNGs scale by 4096, not 65536)."""
    return next(d for d in BIT_DEPTHS if brightest < 2**d)


def load(source, max_pixels: int, limit: str = INGEST_LIMIT, *, exif: bool, target=None):
    """The decoded image (a Pillow image), EXIF orientation applied when `exif`. `target`
    (mode, (width, height) as shown, resize policy) lets a JPEG decode at 1/2, 1/4 or 1/8 scale
    when the policy does not need more. `source`: a path or the file's bytes. `limit` names
    the setting of `max_pixels` in the refusal. Raises BadImage / NotAnImage."""
    from PIL import ImageOps

    with _opened(source, max_pixels, limit) as im:
        if target is not None and im.format == "JPEG":
            mode, want, policy = target
            turned = exif and _orientation(im) in ROTATED
            w, h = _needed(im.size[::-1] if turned else im.size, want, policy)
            im.draft(mode, (h, w) if turned else (w, h))
        im.load()
        return ImageOps.exif_transpose(im) if exif else im.copy()


@contextmanager
def _opened(source, max_pixels: int, limit: str = INGEST_LIMIT):
    """`Image.open` with the pixel limit checked from the header, before anything is decoded,
    and Pillow's errors (at open or while reading: a truncated file) turned into BadImage, or
    NotAnImage for a file Pillow does not recognize whose suffix is no image format's."""
    from PIL import Image, UnidentifiedImageError

    data = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit rules
            image = Image.open(data)
    except Image.DecompressionBombError as exc:
        raise BadImage(f"too many pixels: {exc}") from None
    except UnidentifiedImageError:
        suffix = "" if isinstance(source, bytes) else Path(source).suffix.lower()
        if isinstance(source, bytes) or suffix in image_suffixes():
            raise BadImage("not a readable image (Pillow cannot identify its format)") from None
        raise NotAnImage("not an image file (Pillow does not read it)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(str(exc) or type(exc).__name__) from None
    with image:
        w, h = image.size
        if w * h > max_pixels:
            raise BadImage(
                f"{w}x{h} is {w * h:,} pixels, over the limit of {max_pixels:,} ({limit}): a "
                "decompression bomb, or raise the limit if the image is genuine"
            )
        try:
            yield image
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt pixel data
            raise BadImage(str(exc) or type(exc).__name__) from None


def _orientation(im) -> int:
    return int(im.getexif().get(0x0112, 1))  # the EXIF Orientation tag


def _needed(have: tuple[int, int], want: tuple[int, int], policy: str) -> tuple[int, int]:
    """The smallest decoded size the policy can still resize down from without upscaling."""
    (w, h), (tw, th) = have, want
    if policy == "squash":
        return tw, th
    scale = max(tw / w, th / h) if policy == "crop" else min(tw / w, th / h)
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def to_mode(im, mode: str, depth: int | None, background: tuple[int, int, int] | None):
    """`im` in `mode` ("L" or "RGB"). High-bit values shift down by `depth` (None: the image's
    own depth, the behaviour of models saved before the input contract); a value beyond it is
    a BadImage. Transparency is composited onto `background` (None: Pillow's plain convert)."""
    from PIL import Image

    if im.mode in HIGH_BIT_MODES:
        low, brightest = im.getextrema()  # from the decoded image: no copy
        depth = depth or bit_depth(brightest)
        if low < 0 or brightest >= 2**depth:
            raise BadImage(
                f"pixel values {low}..{brightest} do not fit the {depth}-bit depth the model "
                "was trained on"
            )
        # One int32 working copy (every high-bit mode fits), shifted in place: 4 bytes a pixel
        values = np.asarray(im, dtype=np.int32)
        np.right_shift(values, depth - 8, out=values)
        im = Image.fromarray(values.astype(np.uint8), "L")
    if background is not None and ("A" in im.mode or "transparency" in im.info):
        layer = Image.new("RGBA", im.size, (*background, 255))
        im = Image.alpha_composite(layer, im.convert("RGBA"))
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # palette transparency: through RGBA, as Pillow advises
    return im if im.mode == mode else im.convert(mode)


def resize(pic, size: tuple[int, int], policy: str):
    """crop: shorter side to size, center crop (the ImageNet convention); squash: straight to
    size, aspect ratio lost; pad: longer side to size, centered on black."""
    from PIL import Image, ImageOps

    if policy == "crop":
        return ImageOps.fit(pic, size, Image.Resampling.BILINEAR)
    if policy == "pad":
        return ImageOps.pad(pic, size, Image.Resampling.BILINEAR, color=0)
    return pic.resize(size, Image.Resampling.BILINEAR)
