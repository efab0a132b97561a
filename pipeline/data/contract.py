"""The input contract: what a model takes and how a file or an array becomes its input.

Written once, at ingest, into data/meta.json; carried by the model (its spec in the checkpoint and
the weights artifact, `contract.json`, the registered version's tags). Ingest, evaluate (which
reads what ingest wrote), `pipeline predict`, the batch DAG and the MLflow model all turn inputs
into pixels through `InputContract.decode` (files) and `InputContract.check` (arrays), so a model
is served exactly as it was trained, and refuses what it was not trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.data import images
from pipeline.data.images import BadImage
from pipeline.data.store import chunks

VERSION = 1
CHUNK = 1024  # images per chunk when checking an array: bounded memory for any N
# Files sent to a model (predict, the served model) meet a lower pixel limit than ingest's: a
# 16-megapixel photo; Pillow's own default is 89 MP. An operator's setting, not the data's.
SERVE_PIXELS_ENV = "PIPELINE_SERVE_MAX_PIXELS"
SERVE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class InputContract:
    """Pixels in: uint8 (or numbers on the 0..255 scale) N x C x H x W, or image files.

    Files are decoded as a viewer shows them: EXIF orientation applied (`exif`), transparency
    composited onto `background` (RGB), high-bit grayscale shifted down by the dataset's
    `bit_depth`, converted to C channels and brought to H x W by `resize` (crop | squash | pad;
    None: the model was trained on images of exactly H x W, others are refused). `legacy` marks
    a model saved before contracts: squashed, per-file bit depth, no EXIF, Pillow's conversion.
    """

    shape: tuple[int, int, int]  # C x H x W
    classes: tuple[str, ...]
    resize: str | None
    bit_depth: int | None  # None: each file's own (legacy)
    background: tuple[int, int, int] | None  # None: Pillow's plain conversion (legacy)
    exif: bool
    max_pixels: int
    dtype: str = "uint8"
    value_range: tuple[int, int] = (0, 255)
    legacy: bool = False

    @classmethod
    def legacy_for(cls, shape, classes) -> InputContract:
        """What `pipeline predict` did for a model saved before contracts existed."""
        shape, classes = tuple(shape), tuple(classes)
        limit = images.PILLOW_HARD_LIMIT  # Pillow's own: all there was then
        return cls(shape, classes, "squash", None, None, False, limit, legacy=True)

    @classmethod
    def from_dict(cls, raw: dict) -> InputContract:
        background = raw.get("background")
        return cls(
            tuple(raw["shape"]),
            tuple(raw["classes"]),
            raw.get("resize"),
            raw.get("bit_depth"),
            tuple(background) if background is not None else None,
            bool(raw["exif"]),
            int(raw["max_pixels"]),
            raw.get("dtype", "uint8"),
            tuple(raw.get("value_range", (0, 255))),
            bool(raw.get("legacy", False)),
        )

    def to_dict(self) -> dict:
        """Plain lists, strings and numbers: JSON, MLflow tags, and `torch.load(weights_only)`."""
        raw = asdict(self)
        for key in ("shape", "classes", "background", "value_range"):
            raw[key] = list(raw[key]) if raw[key] is not None else None
        return {"version": VERSION, **raw}

    def describe(self) -> str:
        """One paragraph for the registered version's description and the model card."""
        c, h, w = self.shape
        if self.legacy:
            return (
                f"Takes {c}x{h}x{w} pixels (0..255); saved before input contracts: files are "
                "squashed to size, with no EXIF or transparency handling."
            )
        how = f"resized by `{self.resize}`" if self.resize else f"refused unless {w}x{h}"
        return (
            f"Takes {c}x{h}x{w} uint8 pixels (or numbers on the 0..255 scale; 0..1 and NaN "
            f"are refused), or image files: EXIF orientation applied, transparency on "
            f"RGB{tuple(self.background or ())}, {self.bit_depth}-bit grayscale scaled to 8 "
            f"bits, {how}, at most {self.max_pixels / 1e6:.1f} megapixels (when served, "
            f"{self.serve_pixels() / 1e6:.1f}). "
            f"Classes: {some_names(list(self.classes))}."
        )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), Pillow's order."""
        return self.shape[2], self.shape[1]

    def serve_pixels(self) -> int:
        """The pixel limit of a file sent to the model: `max_pixels` capped at
        PIPELINE_SERVE_MAX_PIXELS (default 16,777,216, 4096 x 4096). Checked from the header,
        so a decompression bomb costs nothing but the refusal."""
        import os

        cap = os.environ.get(SERVE_PIXELS_ENV) or SERVE_PIXELS
        try:
            cap = int(cap)
        except ValueError:
            raise ValueError(
                f"{SERVE_PIXELS_ENV}={cap!r} is not a whole number of pixels"
            ) from None
        return min(self.max_pixels, cap)

    def pixel_limit(self, served: bool) -> tuple[int, str]:
        """(pixels, the setting that sets them) for ingest, or for files `served` to a model."""
        limit = self.serve_pixels() if served else self.max_pixels
        return limit, SERVE_PIXELS_ENV if limit < self.max_pixels else images.INGEST_LIMIT

    def decode(self, source, served: bool = False) -> np.ndarray:
        """One image file (a path or its bytes) as uint8 C x H x W; `served`: sent to the model
        (predict, serving), under `serve_pixels()` instead of ingest's `max_pixels`. Raises
        images.BadImage (or NotAnImage) saying why it cannot be."""
        mode = "L" if self.shape[0] == 1 else "RGB"
        target = (mode, self.size, self.resize) if self.resize else None
        im = images.load(source, *self.pixel_limit(served), exif=self.exif, target=target)
        pic = images.to_mode(im, mode, self.bit_depth, self.background)
        if pic.size != self.size:
            if self.resize is None:
                raise BadImage(
                    f"is {pic.size[0]}x{pic.size[1]}; the model takes {self.size[0]}x"
                    f"{self.size[1]} images and was trained without resizing"
                )
            pic = images.resize(pic, self.size, self.resize)
        pixels = np.asarray(pic, dtype=np.uint8)
        return pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)

    def check(self, pixels: np.ndarray, what: str) -> np.ndarray:
        """`pixels` as N x C x H x W, once every value is known to be what the model was
        trained on; read a chunk at a time, so a memory-mapped array stays on disk. `what`
        names it in the messages ("x.npy", "the input"). Raises ValueError with the problem
        and the fix."""
        c, h, w = self.shape
        if pixels.ndim == 3 and c == 1:
            pixels = pixels[:, None]
        if pixels.ndim != 4 or list(pixels.shape[1:]) != [c, h, w]:
            one = list(pixels.shape) in ([c, h, w], [h, w])
            raise ValueError(
                f"{what} holds images of shape {list(pixels.shape[1:])}; the model takes "
                f"{[c, h, w]} (N x C x H x W, or N x H x W for one channel)"
                + ("; this looks like one image: add the first axis (1 x ...)" if one else "")
            )
        _check_values(pixels, what)
        return pixels


def float_batches(pixels: np.ndarray, size: int = CHUNK) -> Iterator[np.ndarray]:
    """A checked array as float32 batches of `size` images (the network's input dtype)."""
    for _, chunk in chunks(pixels, size):  # a memory map stays on disk: one chunk resident
        yield chunk.astype(np.float32)


def _check_values(pixels: np.ndarray, what: str) -> None:
    if len(pixels) == 0:
        raise ValueError(f"{what} holds no images (shape {list(pixels.shape)})")
    if pixels.dtype == np.uint8:
        return
    is_float = np.issubdtype(pixels.dtype, np.floating)
    if not (is_float or np.issubdtype(pixels.dtype, np.integer)):
        raise ValueError(f"{what} holds {pixels.dtype} values; give uint8 pixels (0..255)")
    low, high, bad, first, scaled = np.inf, -np.inf, 0, None, None
    for start, chunk in chunks(pixels, CHUNK):
        if is_float:
            nonfinite = ~np.isfinite(chunk)
            if nonfinite.any() and first is None:
                first = start + int(np.argmax(nonfinite.reshape(len(chunk), -1).any(axis=1)))
            bad += int(nonfinite.sum())
            if scaled is None:
                scaled = _first_scaled(np.where(nonfinite, 0, chunk), start)
            chunk = chunk[~nonfinite]
        if chunk.size:
            low, high = min(low, chunk.min()), max(high, chunk.max())
    if bad:
        raise ValueError(
            f"{what} has {bad} NaN/Inf values (first in image {first}); the model cannot score them"
        )
    if low < 0 or high > 255:
        raise ValueError(
            f"{what} has values {low:g}..{high:g}; the model takes pixels in 0..255 "
            "(uint8, or numbers on that scale)"
        )
    if scaled is not None:
        i, lo, hi = scaled
        raise ValueError(
            f"{what} looks scaled to 0..1 (image {i}: values {lo:g}..{hi:g}); the model takes "
            "pixels in 0..255: multiply by 255 or save the array as uint8"
        )


def _first_scaled(chunk: np.ndarray, start: int):
    """(index, min, max) of the first image whose values are fractions within 0..1 (scaled by
    1/255: one such image in a batch is refused too), or None."""
    flat = chunk.reshape(len(chunk), -1)
    scaled = (flat.max(axis=1) <= 1) & (flat != np.round(flat)).any(axis=1)
    if not scaled.any():
        return None
    k = int(np.argmax(scaled))
    return start + k, float(flat[k].min()), float(flat[k].max())


def for_dataset(shape, classes, data, resize: str | None, depth: int) -> InputContract:
    """The contract of a dataset written with these `data` settings (config.DataConfig)."""
    from PIL import ImageColor

    return InputContract(
        tuple(int(v) for v in shape),
        tuple(classes),
        resize,
        depth,
        ImageColor.getrgb(data.background)[:3],
        True,
        data.max_image_pixels,
    )


def some_names(classes: list[str], shown: int = 20) -> str:
    """The first `shown` class names, then how many more: a text that stays short with 1,000
    classes (MLflow keeps 5,000 characters of a version's description on PostgreSQL)."""
    more = f", ... ({len(classes) - shown} more)" if len(classes) > shown else ""
    return ", ".join(classes[:shown]) + more
