"""mnist, fashion_mnist: the database's four IDX files, taken as they are distributed.

Found in `source_dir` itself or under `MNIST/raw/` (`FashionMNIST/raw/`, torchvision's layout),
named with `-` or `.` before `idx` (`train-images-idx3-ubyte`, `train-images.idx3-ubyte`),
gzip-compressed or not. Read in place: nothing is written beside them. When they are missing and
`data.download` allows, torchvision downloads them into the project's download folder
(`data.download_dir`), never into `source_dir`. Format: http://yann.lecun.com/exdb/mnist/ (IDX).
"""

from __future__ import annotations

import gzip
import hashlib
import sys
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.sources.common import download_dir, in_memory, need_dir
from pipeline.data.store import DataError, Dataset, Split

FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's class names
# (split, what): the file's stem and IDX suffix; the names every distribution shares.
FILES = {
    ("train", "images"): ("train-images", "idx3-ubyte"),
    ("train", "labels"): ("train-labels", "idx1-ubyte"),
    ("test", "images"): ("t10k-images", "idx3-ubyte"),
    ("test", "labels"): ("t10k-labels", "idx1-ubyte"),
}
DIGITS = "zero one two three four five six seven eight nine"
CLASSES = {
    "mnist": [f"{d} - {w}" for d, w in enumerate(DIGITS.split())],
    "fashion_mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}  # fmt: skip


def names(stem: str, suffix: str) -> list[str]:
    """Every name a distribution uses for one file, preferred first."""
    return [f"{stem}{sep}{suffix}{gz}" for gz in ("", ".gz") for sep in ("-", ".")]


def folders(name: str, root: Path) -> list[Path]:
    """Where the files may lie under `root`: itself, then torchvision's `<Class>/raw/`."""
    return [root, root / FOLDERS[name] / "raw"]


def find(name: str, data: DataConfig) -> dict[tuple[str, str], Path]:
    """The four files, all from one folder: in `data.source_dir` when set (never downloaded:
    it is the user's), else in the download folder, fetched there first when missing and
    `data.download` allows. DataError listing what was found and what is missing otherwise."""
    if data.source_dir:
        root, fix = need_dir(name, data.source_dir), "data.source_dir"
    else:
        root, fix = download_dir(data), "data.source_dir (or allow data.download)"
        if not _complete(name, root) and data.download:
            _download(name, root)
    found = _complete(name, root)
    if found:
        return found
    raise DataError(_missing(name, root, fix))


def _complete(name: str, root: Path) -> dict[tuple[str, str], Path] | None:
    """The first of `folders` that holds all four files."""
    for folder in folders(name, root):
        found = _in(folder)
        if len(found) == len(FILES):
            return found
    return None


def _in(folder: Path) -> dict[tuple[str, str], Path]:
    found = {}
    for key, (stem, suffix) in FILES.items():
        for candidate in names(stem, suffix):
            path = folder / candidate
            if path.is_dir():  # Kaggle's layout: each file in a folder of its own name
                path = path / candidate
            if path.is_file():
                found[key] = path
                break
    return found


def _missing(name: str, root: Path, fix: str) -> str:
    lines = []
    for folder in folders(name, root):
        if folder.is_dir():
            found = _in(folder)
            missing = [f"{FILES[k][0]}-{FILES[k][1]}" for k in FILES if k not in found]
            have = ", ".join(p.name for p in found.values()) or "none of the four"
            lines.append(f"  {folder}: found {have}; missing {', '.join(missing)}")
    where = "\n".join(lines) or f"  {root}: no such folder"
    return (
        f"{name}: the four IDX files were not found:\n{where}\n"
        "Put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (each may end in .gz, and use '.' before idx) in one folder: "
        f"{root} or its {FOLDERS[name]}/raw/; set {fix}"
    )


def _download(name: str, cache: Path) -> None:
    """torchvision's download into the project's download folder (it writes `<Class>/raw/`)."""
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        cls(str(cache), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
        print(f"{name}: the download into {cache} failed ({exc})", file=sys.stderr)


def _read(path: Path) -> bytes:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); replace it with the original") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed when named .gz) as a uint8 array.

    The header is two zero bytes, a type byte (0x08: unsigned byte), the number of dimensions
    and each dimension as a big-endian uint32. DataError when it is not that, or is cut short.
    """
    raw = _read(path)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(
            f"{path}: not an IDX file of unsigned bytes with {ndim} dimension(s) (header "
            f"{raw[:4].hex() or 'empty'}); replace it with the original"
        )
    dims = np.frombuffer(raw, ">u4", ndim, 4).astype(int)
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(
            f"{path}: holds {body.size} bytes of data, its header promises {int(np.prod(dims))} "
            f"({'x'.join(map(str, dims))}); the file is cut short or not the original"
        )
    return body.reshape(dims)


def recipe(name: str, data: DataConfig) -> dict:
    """The files' content, decompressed, under their canonical names: a copy elsewhere, gzip or
    not, with '-' or '.', is the same data version. Before a download (no `source_dir`, files
    not fetched yet) only the dataset; with a `source_dir` that lacks them, DataError (before
    anything is written)."""
    try:
        files = find(name, data.model_copy(update={"download": False}))
    except DataError:
        if data.source_dir:
            raise
        return {"dataset": name}
    digest = hashlib.md5()
    for key in sorted(files):
        stem, suffix = FILES[key]
        content = hashlib.md5(_read(files[key])).hexdigest()
        digest.update(f"{stem}-{suffix}\0{content}\n".encode())
    return {"dataset": name, "source_files": {".": {"files": 4, "md5": digest.hexdigest()}}}


def load(name: str, data: DataConfig) -> Dataset:
    """uint8 (N, 1, 28, 28) images and int64 labels; the dataset's own train / test split."""
    files = find(name, data)
    splits = []
    for split in ("train", "test"):
        images = read_idx(files[split, "images"], 3)
        labels = read_idx(files[split, "labels"], 1).astype(np.int64)
        if len(images) != len(labels) or images.shape[1:] != (28, 28):
            raise DataError(
                f"{name}: {files[split, 'images'].name} holds {images.shape} images, "
                f"{files[split, 'labels'].name} {len(labels)} labels; expected (N, 28, 28) and N"
            )
        if labels.size and labels.max() >= 10:
            raise DataError(f"{name}: {files[split, 'labels']} has label {labels.max()} (0-9 only)")
        splits.append(Split(images[:, None], labels))
    return Dataset(name, CLASSES[name], splits[0], splits[1], "idx")


MNIST = in_memory(partial(load, "mnist"), partial(recipe, "mnist"))
FASHION_MNIST = in_memory(partial(load, "fashion_mnist"), partial(recipe, "fashion_mnist"))
