"""Dataset sources: each returns a `Dataset` of uint8 (N, C, H, W) images with a fixed split.

`digits` ships with scikit-learn (the offline default). `mnist`, `fashion_mnist` and `cifar10`
read the dataset's own raw files from `source_dir`, downloading them with torchvision first when
allowed and missing. `imagefolder` (a folder of photos) streams to disk: see `imagefolder.py`.
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.contract import for_dataset
from pipeline.data.fingerprint import fingerprint
from pipeline.data.images import hidden
from pipeline.data.store import DataError, Dataset, Split, write_dataset

CIFAR10_DIR = "cifar-10-batches-py"
MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's class names


def recipe(name: str, data: DataConfig) -> dict:
    """The settings and the source content that determine a dataset's bytes, for the sources
    they apply to.

    Stored in meta.json, so a pull with other settings, or from a source whose files changed,
    knows data/ is not what it asks for."""
    if name == "digits":
        return {"dataset": name, "test_fraction": data.test_fraction}
    if name in ("mnist", "fashion_mnist", "cifar10"):
        root = need_dir(name, data.source_dir)
        raw = root / (CIFAR10_DIR if name == "cifar10" else f"{MNIST_FOLDERS[name]}/raw")
        files = [str(f) for f in sorted(raw.glob("*")) if f.is_file() and not hidden(f.name)]
        return {
            "dataset": name,
            "source_dir": _resolved(data.source_dir),
            "source_files": fingerprint(root, files),
        }
    if name == "imagefolder":
        from pipeline.data.imagefolder import list_files

        root = need_dir(name, data.source_dir).resolve()
        return {
            "dataset": name,
            "source_dir": str(root),
            "source_files": fingerprint(root, list_files(root).files),
            "test_fraction": data.test_fraction,
            "image_size": data.image_size,
            "resize": data.resize,
            "on_bad_image": data.on_bad_image,
            "background": data.background,
            "max_image_pixels": data.max_image_pixels,
        }
    raise DataError(f"unknown dataset {name!r}")


def _resolved(source_dir: Path | str | None) -> str | None:
    return str(Path(source_dir).resolve()) if source_dir else None


def write_source(name: str, data: DataConfig, data_dir: Path, made_by: dict | None = None):
    """Write dataset `name` from its source to `data_dir` (replacing what is there); `made_by`:
    its `recipe`, when the caller has it already (a photo folder's is one read of the folder)."""
    if name == "imagefolder":
        from pipeline.data.imagefolder import ingest

        made_by = made_by or recipe(name, data)
        ingest(need_dir(name, data.source_dir).resolve(), data, data_dir, made_by)
        return
    ds = load_source(name, data)
    contract = for_dataset(ds.shape, ds.classes, data, None, 8)  # arrays: fixed size, 8-bit
    made_by = recipe(name, data)  # after loading: a download has brought the files
    write_dataset(replace(ds, recipe=made_by, contract=contract.to_dict()), data_dir)


def load_source(name: str, data: DataConfig) -> Dataset:
    """The built-in datasets, which fit in memory (CIFAR-10, the largest, is 180 MB)."""
    if name == "digits":
        return digits(data.test_fraction)
    if name in ("mnist", "fashion_mnist"):
        return mnist_like(name, need_dir(name, data.source_dir), data.download)
    if name == "cifar10":
        return cifar10(need_dir(name, data.source_dir), data.download)
    raise DataError(f"dataset {name!r} is not held in memory; `write_source` writes it")


def need_dir(name: str, source_dir: Path | str | None) -> Path:
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
