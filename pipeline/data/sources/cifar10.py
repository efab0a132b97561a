"""cifar10: the python batches, taken as distributed: the extracted `cifar-10-batches-py/` (in
`source_dir`, or `source_dir` itself) or the `cifar-10-python.tar.gz` archive, read without
extracting it. Without `source_dir`, torchvision downloads them into the project's download
folder when `data.download` allows. The batches are pickles: a restricted unpickler loads them
without executing anything else. Format: https://www.cs.toronto.edu/~kriz/cifar.html"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.sources.common import download_dir, in_memory, need_dir
from pipeline.data.store import DataError, Dataset, Split

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
BATCHES = ["batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


def find(data: DataConfig) -> Path:
    """The folder holding every batch, or the archive: in `data.source_dir` when set (never
    downloaded: it is the user's), else in the download folder, fetched first when missing and
    allowed. DataError listing what was found and what is missing otherwise."""
    if (
        data.source_dir
        and Path(data.source_dir).name == ARCHIVE
        and Path(data.source_dir).is_file()
    ):
        return Path(data.source_dir)  # the archive itself was named
    if data.source_dir:
        root, fix = need_dir("cifar10", data.source_dir), "data.source_dir"
    else:
        root, fix = download_dir(data), "data.source_dir (or allow data.download)"
        if _located(root) is None and data.download:
            _download(root)
    found = _located(root)
    if found is not None:
        return found
    seen = [
        f"  {folder}: found {', '.join(b for b in BATCHES if (folder / b).is_file()) or 'none'}"
        for folder in (root / FOLDER, root)
        if folder.is_dir()
    ]
    raise DataError(
        "cifar10: the python batches were not found:\n"
        + ("\n".join(seen) or f"  {root}: no such folder")
        + f"\nNeeded: {', '.join(BATCHES)} in {root / FOLDER} (or {root} itself), or {ARCHIVE} "
        f"in {root}; set {fix}"
    )


def _located(root: Path) -> Path | None:
    for folder in (root / FOLDER, root):
        if all((folder / b).is_file() for b in BATCHES):
            return folder
    return root / ARCHIVE if (root / ARCHIVE).is_file() else None


def _download(root: Path) -> None:
    import sys

    from torchvision import datasets

    try:
        datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
        print(f"cifar10: the download into {root} failed ({exc})", file=sys.stderr)


def recipe(data: DataConfig) -> dict:
    """The batches' content under their names, from the folder or the archive alike: a copy,
    or the archive of the same batches, is the same data version. Before a download only the
    dataset; with a `source_dir` that lacks them, DataError (before anything is written)."""
    try:
        found = find(data.model_copy(update={"download": False}))
    except DataError:
        if data.source_dir:
            raise
        return {"dataset": "cifar10"}
    digest = hashlib.md5()
    raw = _raw(found)
    for name in BATCHES:
        digest.update(f"{name}\0{hashlib.md5(raw.get(name, b'')).hexdigest()}\n".encode())
    return {
        "dataset": "cifar10",
        "source_files": {".": {"files": len(raw), "md5": digest.hexdigest()}},
    }


def _raw(found: Path) -> dict[str, bytes]:
    """Each batch file's bytes, from the folder or from the archive without extracting it."""
    if found.is_dir():
        return {b: (found / b).read_bytes() for b in BATCHES}
    try:
        with tarfile.open(found, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            return {b: tar.extractfile(members[b]).read() for b in BATCHES if b in members}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(
            f"cifar10: {found} is not a readable .tar.gz ({exc}); download it again"
        ) from None


def load(data: DataConfig) -> Dataset:
    """uint8 (N, 3, 32, 32) images; the dataset's own train / test split."""
    return cifar10(find(data))


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


def cifar10(found: Path) -> Dataset:
    """CIFAR-10 from the folder of python batches or the .tar.gz archive (`find`)."""
    raw = _raw(found)

    def batch(file: str) -> dict:
        where = found / file if found.is_dir() else f"{found}:{FOLDER}/{file}"
        if file not in raw:
            raise DataError(f"cifar10: {where} is missing")
        try:
            loaded = _BatchUnpickler(io.BytesIO(raw[file]), encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise DataError(
                f"cifar10: {where} is not an official CIFAR-10 python batch ({exc}); "
                "replace it with the file from cifar-10-python.tar.gz"
            ) from None
        if not isinstance(loaded, dict):
            raise DataError(f"cifar10: {where} holds a {type(loaded).__name__}, not a batch dict")
        # Pickled by Python 2, read as latin1 the keys are str; `pickle.load(encoding="bytes")`
        # writers (and some re-packagings) leave them bytes.
        return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in loaded.items()}

    def field(part: dict, key: str, file: str):
        if key not in part:
            raise DataError(
                f"cifar10: {file} has no {key!r} (it has {', '.join(map(repr, part)) or 'nothing'}"
                "); replace it with the file from cifar-10-python.tar.gz"
            )
        return part[key]

    meta = batch("batches.meta")
    classes = [
        c.decode() if isinstance(c, bytes) else str(c)
        for c in field(meta, "label_names", "batches.meta")
    ]

    def checked(file: str) -> Split:
        """One batch's uint8 (N, 3, 32, 32) images and int64 labels, refused when they do not
        pair up: a label list one short would shift every later label silently."""
        part = batch(file)
        data, labels = (
            np.asarray(field(part, "data", file)),
            np.asarray(field(part, "labels", file)),
        )
        problem = None
        if data.dtype != np.uint8:
            problem = f"its data is {data.dtype}, not uint8 pixels"
        elif data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            problem = f"its data has shape {data.shape}, not (N, 3072)"
        elif labels.shape != (len(data),):
            problem = f"it holds {len(data)} images but {labels.size} labels"
        elif labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            bad = labels.min() if labels.min() < 0 else labels.max()
            problem = f"it has label {bad} ({len(classes)} classes: 0-{len(classes) - 1} only)"
        if problem:
            raise DataError(
                f"cifar10: {file}: {problem}; replace it with the file from cifar-10-python.tar.gz"
            )
        return Split(data.reshape(-1, 3, 32, 32), labels.astype(np.int64))

    def split(files: list[str]) -> Split:
        parts = [checked(f) for f in files]
        images = np.concatenate([p.images for p in parts])
        return Split(images, np.concatenate([p.labels for p in parts]))

    train = split([f"data_batch_{i}" for i in range(1, 6)])
    return Dataset("cifar10", classes, train, split(["test_batch"]), "cifar-10-python")


SOURCE = in_memory(load, recipe)
