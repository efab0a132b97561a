"""Dataset sources: each returns a `Dataset` of uint8 (N, C, H, W) images with a fixed split.

`digits` ships with scikit-learn (the offline default). `mnist`, `fashion_mnist` and `cifar10`
read the dataset's own raw files from `source_dir`, downloading them with torchvision first when
allowed and missing. `imagefolder` reads a folder of class sub-folders.
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.data.store import DataError, Dataset, Split

CIFAR10_DIR = "cifar-10-batches-py"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def recipe(
    name: str,
    source_dir: Path | str | None = None,
    test_fraction: float = 0.2,
    image_size: int | None = None,
) -> dict:
    """The settings that determine a dataset's bytes, for the sources they apply to.

    Stored in meta.json, so a pull with other settings knows data/ is not what it asks for."""
    if name == "digits":
        return {"dataset": name, "test_fraction": test_fraction}
    if name in ("mnist", "fashion_mnist", "cifar10"):
        return {"dataset": name, "source_dir": _resolved(source_dir)}
    if name == "imagefolder":
        return {
            "dataset": name,
            "source_dir": _resolved(source_dir),
            "test_fraction": test_fraction,
            "image_size": image_size,
        }
    raise DataError(f"unknown dataset {name!r}")


def _resolved(source_dir: Path | str | None) -> str | None:
    return str(Path(source_dir).resolve()) if source_dir else None


def load_source(
    name: str,
    source_dir: Path | None = None,
    download: bool = True,
    test_fraction: float = 0.2,
    image_size: int | None = None,
) -> Dataset:
    made_by = recipe(name, source_dir, test_fraction, image_size)
    if name == "digits":
        ds = digits(test_fraction)
    elif name in ("mnist", "fashion_mnist"):
        ds = mnist_like(name, _need_dir(name, source_dir), download)
    elif name == "cifar10":
        ds = cifar10(_need_dir(name, source_dir), download)
    else:
        ds = imagefolder(_need_dir(name, source_dir), test_fraction, image_size)
    return replace(ds, recipe=made_by)


def _need_dir(name: str, source_dir: Path | None) -> Path:
    if source_dir is None:
        raise DataError(f"dataset {name!r} needs data.source_dir (where its raw files live)")
    return Path(source_dir)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean test mask with the same class proportions in both splits.

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


def _from_mask(images, labels, is_test) -> tuple[Split, Split]:
    return Split(images[~is_test], labels[~is_test]), Split(images[is_test], labels[is_test])


def digits(test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 intensities scaled to the 0..255 range every other source uses.
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train, test = _from_mask(images, labels, stratified_split(labels, test_fraction))
    return Dataset("digits", [str(i) for i in range(10)], train, test, "sklearn.load_digits")


def mnist_like(name: str, root: Path, download: bool) -> Dataset:
    """MNIST / Fashion-MNIST from their IDX files under `root/<MNIST|FashionMNIST>/raw/`."""
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True"
            raise DataError(
                f"{name}: raw IDX files not found under {root / cls.__name__ / 'raw'} and "
                f"download {'failed' if download else 'is off'} ({exc}); put "
                "train-images-idx3-ubyte etc. there or allow data.download"
            ) from None
        splits.append(Split(ds.data.numpy()[:, None], ds.targets.numpy().astype(np.int64)))
    return Dataset(name, list(cls.classes), splits[0], splits[1], f"torchvision.{cls.__name__}")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what the official CIFAR-10 batches hold (dicts, lists, bytes, str, numbers and
    numpy arrays) and refuses every other global, so a crafted file cannot run code."""

    ALLOWED = {
        (module, name)
        for core in ("numpy.core", "numpy._core")
        for module, name in (
            (f"{core}.multiarray", "_reconstruct"),
            (f"{core}.multiarray", "scalar"),
            (f"{core}.numeric", "_frombuffer"),
        )
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only dicts, lists, "
                "bytes, strings, numbers and numpy arrays"
            )
        return super().find_class(module, name)


def cifar10(root: Path, download: bool) -> Dataset:
    """CIFAR-10 from the python batches in `root/cifar-10-batches-py/`.

    The batches are pickles; `_BatchUnpickler` loads them without executing anything else.
    """
    folder = root / CIFAR10_DIR
    if not folder.exists() and download:
        from torchvision import datasets

        try:
            datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
            raise DataError(f"cifar10: download to {root} failed ({exc})") from None
    if not folder.exists():
        raise DataError(f"cifar10: {folder} not found; put the python batches there")

    def batch(file: str) -> dict:
        path = folder / file
        try:
            with open(path, "rb") as fh:
                loaded = _BatchUnpickler(fh, encoding="latin1").load()
        except FileNotFoundError:
            raise DataError(f"cifar10: {path} is missing") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise DataError(
                f"cifar10: {path} is not an official CIFAR-10 python batch ({exc}); "
                "replace it with the file from cifar-10-python.tar.gz"
            ) from None
        if not isinstance(loaded, dict):
            raise DataError(f"cifar10: {path} holds a {type(loaded).__name__}, not a batch dict")
        return loaded

    def split(files: list[str]) -> Split:
        parts = [batch(f) for f in files]
        images = np.concatenate([np.asarray(p["data"], np.uint8) for p in parts])
        labels = np.concatenate([np.asarray(p["labels"], np.int64) for p in parts])
        return Split(images.reshape(-1, 3, 32, 32), labels)

    classes = list(batch("batches.meta")["label_names"])
    train = split([f"data_batch_{i}" for i in range(1, 6)])
    return Dataset("cifar10", classes, train, split(["test_batch"]), "cifar-10-python")


def imagefolder(root: Path, test_fraction: float, image_size: int | None) -> Dataset:
    """`root/<class>/<image>`; grayscale if every image is, else RGB; one size for all.

    Images with more than 8 bits per value (16-bit PNG/TIFF, 32-bit integer TIFF) are scaled, not
    clipped, into 0..255 by the dataset's bit depth (see `_bit_depth`); float images are refused:
    they have no fixed range to scale from."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DataError(f"imagefolder: {root} is not a folder of class sub-folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [
        (f, c)
        for c, name in enumerate(classes)
        for f in sorted((root / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataError(f"imagefolder: no images under {root}/<class>/ ({sorted(IMAGE_SUFFIXES)})")
    pics = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                im.load()
                pics.append(im.copy())
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"imagefolder: cannot read image {path}: {exc}") from None
        if pics[-1].mode == "F":
            raise DataError(
                f"imagefolder: {path} is a floating-point image, which has no fixed range to "
                "scale into 0..255; save it as an 8- or 16-bit integer image"
            )
    depth = _bit_depth([(path, pic) for (path, _), pic in zip(files, pics, strict=True)])
    mode = "L" if all(p.mode in ("L", "1", *HIGH_BIT_MODES) for p in pics) else "RGB"
    size = (image_size, image_size) if image_size else pics[0].size
    arrays = []
    for (path, _), pic in zip(files, pics, strict=True):
        if pic.size != size and not image_size:
            raise DataError(
                f"imagefolder: {path} is {pic.size[0]}x{pic.size[1]}, others {size[0]}x{size[1]};"
                " set data.image_size to resize all images"
            )
        arr = np.asarray(_to_8bit(pic, depth).convert(mode).resize(size), dtype=np.uint8)
        arrays.append(arr[None] if mode == "L" else arr.transpose(2, 0, 1))
    images, labels = np.stack(arrays), np.array([c for _, c in files], dtype=np.int64)
    train, test = _from_mask(images, labels, stratified_split(labels, test_fraction))
    return Dataset("imagefolder", classes, train, test, str(root))


# Pillow's modes for one channel of more than 8 bits; `convert("L")` would clip them at 255.
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)


def _bit_depth(pics: list) -> int:
    """The bit depth of the dataset's high-bit images: the smallest of 8/10/12/14/16/24/32 bits
    that holds their brightest value. One depth for the whole dataset keeps relative brightness
    between images (a 12-bit camera's files in 16-bit PNGs scale by 4096, not 65536)."""
    brightest = 0
    for path, pic in pics:
        if pic.mode in HIGH_BIT_MODES:
            low, high = pic.getextrema()
            if low < 0:
                raise DataError(f"imagefolder: {path} has negative pixel values ({low})")
            brightest = max(brightest, high)
    return next(d for d in BIT_DEPTHS if brightest < 2**d)


def _to_8bit(pic, depth: int):
    """High-bit grayscale scaled into 0..255 by `depth` bits; other modes as they are."""
    from PIL import Image

    if pic.mode not in HIGH_BIT_MODES:
        return pic
    values = np.asarray(pic, dtype=np.int64) >> (depth - 8)
    return Image.fromarray(values.astype(np.uint8), "L")
