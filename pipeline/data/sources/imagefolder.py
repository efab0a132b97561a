"""ImageFolder ingest: a folder of photos to data/ in bounded memory.

Layouts: `root/<class>/**` (split at random, stratified by class, `data.test_fraction`), or the
ImageNet layout `root/train/<class>/**` + `root/val/<class>/**` (the given split); sub-folders of
a class folder belong to the class. Files are probed
(mode, size, high-bit range), then decoded in worker processes a batch at a time and appended to
data/ in file order, so memory holds a few batches and any worker count writes the same bytes.
Every file Pillow reads is an image, whatever its suffix. A file that is no image (a README,
Thumbs.db) is left out and listed in meta.json (`skipped`); an image that cannot be decoded fails
the pull naming it, or with `data.on_bad_image: skip` is left out and listed too. Hidden files and
folders (`.DS_Store`, `.ipynb_checkpoints/`, `__MACOSX/`) are ignored.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.contract import InputContract, for_dataset
from pipeline.data.fingerprint import fingerprint
from pipeline.data.images import BadImage, NotAnImage, Probe, bit_depth, hidden, probe
from pipeline.data.sources.common import Source, need_dir, stratified_split
from pipeline.data.store import DatasetWriter
from pipeline.errors import DataError

BATCH = 64  # files per worker task: large enough to amortize the hand-off, small in memory
GIVEN_SPLITS = {"train": "train", "val": "test"}  # ImageNet layout folder -> our split
SPLIT_NAMES = {"train", "val", "valid", "validation", "test", "testing"}  # in any case


@dataclass(frozen=True)
class Listing:
    classes: list[str]
    files: list[str]  # strings, not Paths: a few hundred bytes less per file at 100,000 files
    labels: np.ndarray
    is_test: np.ndarray | None  # the layout's own split; None: split at random
    left_out: dict[str, str] = field(default_factory=dict)  # {path: why}: links, never followed


def list_files(root: Path) -> Listing:
    """Every visible file of the class folders, labelled; files beside the class folders too,
    labelled -1 (they belong to no class: listed as skipped). Links are never followed; each
    is in `left_out` with the reason (`_Walk`)."""
    if not root.is_dir():
        raise DataError(f"imagefolder: {root} is not a folder of class sub-folders")
    walk = _Walk(str(root))
    folders = _class_folders(root, walk)
    if folders != list(GIVEN_SPLITS) and any(f.lower() in SPLIT_NAMES for f in folders):
        raise DataError(
            f"imagefolder: {root} holds {', '.join(f'{f}/' for f in folders)}; with split "
            "folders it must hold exactly train/<class>/ and val/<class>/ (val/ becomes the test "
            "split): rename, merge or move the others"
        )
    if set(folders) == set(GIVEN_SPLITS):
        classes = _class_folders(root / "train", walk)
        unknown = sorted(set(_class_folders(root / "val", walk)) - set(classes))
        if unknown:
            raise DataError(
                f"imagefolder: {root}/val has classes {unknown} that {root}/train does not; "
                "every validation class needs training images"
            )
        stray = walk.files(str(root))
        parts = [_files(walk, root / folder, classes) for folder in GIVEN_SPLITS]
        files = stray + parts[0][0] + parts[1][0]
        labels = np.concatenate([np.full(len(stray), -1), parts[0][1], parts[1][1]])
        is_test = np.repeat([False, False, True], [len(stray), len(parts[0][0]), len(parts[1][0])])
        listing = Listing(classes, files, labels, is_test, walk.left_out)
    else:
        classes = folders
        files, labels = _files(walk, root, classes)
        listing = Listing(classes, files, labels, None, walk.left_out)
    if not (listing.labels >= 0).any():
        raise DataError(
            f"imagefolder: no files under {root}/<class>/ or {root}/train/<class>/ "
            "(hidden files and folders are ignored)"
        )
    return listing


def _class_folders(folder: Path, walk: _Walk) -> list[str]:
    """The visible folders of `folder`, without links (a class under two names, or photos
    elsewhere), which go to the walk's `left_out`."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not hidden(p.name))
    return [n for n in names if not walk.linked(str(folder / n))]


class _Walk:
    """The files under a source folder. Links are never followed: a photo folder may come from
    anyone (an unpacked archive), and a link would read files from elsewhere on the machine
    into the dataset and its DVC remote. Each link goes to `left_out` {path: reason}: dangling,
    into the source folder (its target is read where it lies, once), or out of it."""

    def __init__(self, root: str):
        self.root, self.left_out = root, {}

    def files(self, folder: str, recursive: bool = False) -> list[str]:
        """Visible files under `folder` (and its sub-folders, as torchvision's ImageFolder
        takes them), hidden files and folders left out; sorted, the same everywhere."""
        found = []  # `folder`: the source or a class folder, never a link (`_class_folders`)
        for parent, dirs, names in os.walk(folder):
            visible = [d for d in sorted(dirs) if recursive and not hidden(d)]
            dirs[:] = [d for d in visible if not self.linked(os.path.join(parent, d))]
            paths = [os.path.join(parent, n) for n in names if not hidden(n)]
            found += [path for path in paths if not self.linked(path) and os.path.isfile(path)]
        return sorted(found)

    def linked(self, path: str) -> bool:
        """Whether `path` is a link (left out, with the reason)."""
        if not os.path.islink(path):
            return False
        real = os.path.realpath(path)
        if not os.path.exists(real):
            try:
                os.stat(path)
                why = "a dangling link"
            except OSError as exc:  # ELOOP: links that lead back to themselves
                why = "a link loop" if exc.errno == errno.ELOOP else "a dangling link"
            self.left_out[path] = f"{why} (to {os.readlink(path)})"
        elif real == self.root or real.startswith(self.root + os.sep):
            self.left_out[path] = f"a link to {real}: inside the source folder, read there once"
        else:
            self.left_out[path] = (
                f"a link to {real}: outside the source folder, never read; copy it in "
                "(`cp -rL`) to use it"
            )
        return True


def _files(walk: _Walk, folder: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    files = walk.files(str(folder))  # beside the class folders: no class, skipped on record
    labels = [-1] * len(files)
    for label, name in enumerate(classes):
        if (folder / name).is_dir():
            found = walk.files(str(folder / name), recursive=True)
            files += found
            labels += [label] * len(found)
    return files, np.array(labels, dtype=np.int64)


def recipe(data: DataConfig) -> dict:
    """What a folder's data version is made of: the files' content and the decoding settings;
    not the folder's path (a copy of the same photos is the same version)."""
    root = need_dir("imagefolder", data.source_dir).resolve()
    return {
        "dataset": "imagefolder",
        "source_files": fingerprint(root, list_files(root).files),
        "test_fraction": data.test_fraction,
        "image_size": data.image_size,
        "resize": data.resize,
        "on_bad_image": data.on_bad_image,
        "background": data.background,
        "max_image_pixels": data.max_image_pixels,
    }


def write(data: DataConfig, data_dir: Path, made_by: dict | None) -> None:
    root = need_dir("imagefolder", data.source_dir).resolve()
    ingest(root, data, data_dir, made_by or recipe(data))


def ingest(root: Path, data: DataConfig, data_dir: Path, recipe: dict) -> dict[str, str]:
    """Write the folder to `data_dir`; returns what was skipped ({path: reason})."""
    listing = list_files(root)
    workers = data.workers or os.cpu_count() or 1
    with _pool(workers) as pool:
        probes = _probe_all(pool, listing.files, data.max_image_pixels)
        stray = {int(i): "not inside a class folder" for i in np.flatnonzero(listing.labels < 0)}
        left_out = {_name(root, path): why for path, why in listing.left_out.items()}
        errors = {i: r for i, r in probes.errors.items() if i not in stray}
        skipped = left_out | _bad(root, listing.files, probes.not_images | stray, "skip")
        skipped |= _bad(root, listing.files, errors, data.on_bad_image)
        while True:  # again only when a probed file then failed to decode (a truncated JPEG)
            keep = np.array([_name(root, f) not in skipped for f in listing.files])
            files = [f for f, k in zip(listing.files, keep, strict=True) if k]
            if not files:
                raise DataError(f"imagefolder: no readable images under {root} ({_some(skipped)})")
            good = probes.subset(keep)
            labels = listing.labels[keep]
            _every_class_has_images(root, listing.classes, labels)
            if listing.is_test is not None:
                is_test = listing.is_test[keep]
            else:
                is_test = stratified_split(labels, data.test_fraction)
            contract = _contract(files, good, listing.classes, data)
            counts = {"train": int((~is_test).sum()), "test": int(is_test.sum())}
            meta = {
                "name": "imagefolder",
                "classes": listing.classes,
                "shape": list(contract.shape),
                "dtype": "uint8",
                "source": str(root),
                "recipe": recipe,
                "contract": contract.to_dict(),
                "splits": counts,
                "skipped": [{"path": p, "reason": r} for p, r in sorted(skipped.items())],
            }
            failed = _write(pool, files, labels, is_test, contract, counts, data_dir, meta)
            if not failed:
                return skipped
            skipped |= _bad(root, list(failed), failed, data.on_bad_image)


def _every_class_has_images(root: Path, classes: list[str], labels: np.ndarray) -> None:
    empty = [c for k, c in enumerate(classes) if not (labels == k).any()]
    if empty:
        raise DataError(
            f"imagefolder: class folder(s) {empty} under {root} hold no readable images (what "
            "they hold is not an image, or was skipped); add images or remove the folder"
        )


def _some(skipped: dict[str, str]) -> str:
    shown = "; ".join(f"{p}: {r}" for p, r in list(skipped.items())[:3])
    return shown + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")


def _write(pool, files, labels, is_test, contract, counts, data_dir, meta) -> dict:
    """Decode `files` into a new data/; {path: BadImage} instead when some fail to decode."""
    failed = {}
    with DatasetWriter(data_dir, contract.shape, counts) as writer:
        start = 0
        decoded = _map(pool, _decode_batch, ((batch, contract) for batch in _batches(files)))
        for pixels, errors in _progress(decoded, "decode", len(files)):
            end = start + len(pixels)
            for offset, reason in errors.items():
                failed[files[start + offset]] = reason
            for split, mask in (("train", ~is_test[start:end]), ("test", is_test[start:end])):
                writer.append(split, pixels[mask], labels[start:end][mask])
            start = end
        if not failed:
            writer.commit(meta)
    return failed


@dataclass(frozen=True)
class Probes:
    """What the probe pass found, as arrays (a few bytes per file, not an object each)."""

    gray: np.ndarray  # bool
    sizes: np.ndarray  # width, height as shown (EXIF orientation applied)
    brightest: np.ndarray  # high-bit images' largest value, else 0
    errors: dict[int, str]  # file index -> why this image cannot be read
    not_images: dict[int, str]  # file index -> why it is no image at all

    def subset(self, keep: np.ndarray) -> Probes:
        return Probes(self.gray[keep], self.sizes[keep], self.brightest[keep], {}, {})


def _probe_all(pool, files: list[str], max_pixels: int) -> Probes:
    n = len(files)
    gray, sizes = np.zeros(n, bool), np.zeros((n, 2), np.int64)
    brightest, errors, not_images = np.zeros(n, np.int64), {}, {}
    start = 0
    tasks = ((batch, max_pixels) for batch in _batches(files))
    for batch in _progress(_map(pool, _probe_batch, tasks), "probe", n):
        for i, found in enumerate(batch, start=start):
            if isinstance(found, NotAnImage):
                not_images[i] = str(found)
            elif isinstance(found, BadImage):
                errors[i] = str(found)
            else:
                gray[i], sizes[i], brightest[i] = found.gray, found.size, found.brightest
        start += len(batch)
    return Probes(gray, sizes, brightest, errors, not_images)


def _contract(files: list[str], probes: Probes, classes, data: DataConfig) -> InputContract:
    """Grayscale if every image is, else RGB; one bit depth and one size for the dataset."""
    channels = 1 if probes.gray.all() else 3
    depth = bit_depth(int(probes.brightest.max(initial=0)))
    if data.image_size:
        shape = (channels, data.image_size, data.image_size)
        return for_dataset(shape, classes, data, data.resize, depth)
    w, h = (int(v) for v in probes.sizes[0])
    other = np.flatnonzero((probes.sizes != probes.sizes[0]).any(axis=1))
    if len(other):
        ow, oh = probes.sizes[other[0]]
        raise DataError(
            f"imagefolder: {files[other[0]]} is {ow}x{oh}, others {w}x{h} (as shown: EXIF "
            "orientation applied); set data.image_size to bring all images to one size "
            "(data.resize says how)"
        )
    return for_dataset((channels, h, w), classes, data, None, depth)


def _name(root: Path, path: str) -> str:
    return str(Path(path).relative_to(root))


def _bad(root: Path, files: list, errors: dict, policy: str) -> dict[str, str]:
    """{path under root: reason} of the files with an error (`errors`: keyed by index, or by
    the file itself); with the `fail` policy a DataError naming the first instead."""
    bad = {}
    for i, f in enumerate(files):
        reason = errors.get(i, errors.get(f))
        if reason is not None:
            bad[_name(root, f)] = reason
    if bad and policy == "fail":
        first, reason = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(
            f"imagefolder: cannot read image {root / first}: {reason}{more}; fix or remove it, "
            "or set data.on_bad_image=skip to leave such files out (listed in data/meta.json)"
        )
    return bad


def _batches(items: list) -> Iterator[list]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def _probe_batch(args) -> list[Probe | BadImage]:
    files, max_pixels = args
    out = []
    for f in files:
        try:
            out.append(probe(f, max_pixels))
        except BadImage as exc:
            out.append(exc)
    return out


def _decode_batch(args) -> tuple[np.ndarray, dict[int, str]]:
    """A batch of files as one uint8 array; a file that fails is zeros, its reason by offset."""
    files, contract = args
    pixels = np.zeros((len(files), *contract.shape), np.uint8)
    errors = {}
    for i, f in enumerate(files):
        try:
            pixels[i] = contract.decode(f)
        except BadImage as exc:
            errors[i] = str(exc)
    return pixels, errors


@contextmanager
def _pool(workers: int):
    """Worker processes (spawned: nothing inherited but the arguments); None for one worker."""
    if workers <= 1:
        yield None
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield pool


def _map(pool, fn, tasks: Iterable):
    """fn over tasks in order: in the pool's workers, or here for one worker."""
    return map(fn, tasks) if pool is None else pool.imap(fn, tasks)


def _progress(results: Iterable, what: str, total: int | None = None):
    """A progress bar on a terminal (images, img/s, ETA); a line every 30 s in a log."""
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        desc=f"imagefolder {what}",
        unit="img",
        mininterval=0.5 if sys.stderr.isatty() else 30,
        file=sys.stderr,
        disable=total is None,
    )
    with bar:
        for result in results:
            bar.update(len(result[0]) if isinstance(result, tuple) else len(result))
            yield result


SOURCE = Source(recipe=recipe, write=write)
