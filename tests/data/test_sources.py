"""Dataset sources read each dataset's real on-disk format, and digits is byte-for-byte stable."""

import hashlib
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.sources import load_source, write_source
from pipeline.data.sources.common import stratified_split
from pipeline.data.store import DataError, read_dataset, write_dataset


def _source(name, folder=None, **data):
    return load_source(name, DataConfig(source_dir=folder and str(folder), **data))


def _imagefolder_ds(folder, **data):
    """The folder ingested into a data/ beside it, read back."""
    out = folder.parent / f"{folder.name}-data"
    write_source("imagefolder", DataConfig(source_dir=str(folder), **data), out)
    return read_dataset(out)


def _md5s(folder):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_digits_is_written_deterministically_with_every_class_in_both_splits(tmp_path, digits):
    write_dataset(digits, tmp_path / "a")
    write_dataset(_source("digits"), tmp_path / "b")
    assert _md5s(tmp_path / "a") == _md5s(tmp_path / "b")
    ds = read_dataset(tmp_path / "a")
    assert ds.train.images.shape[1:] == (1, 8, 8) and ds.train.images.dtype == np.uint8
    assert len(ds.train.labels) + len(ds.test.labels) == 1797
    assert set(ds.test.labels) == set(ds.train.labels) == set(range(10))
    assert ds.train.images.max() == 255


def test_stratified_split_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [100, 50, 20, 10])
    is_test = stratified_split(labels, 0.2)
    assert [int(is_test[labels == c].sum()) for c in range(4)] == [20, 10, 4, 2]


def _idx(path, array, magic):
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_mnist_like_reads_idx_files(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    for prefix, n in (("train", 30), ("t10k", 12)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 0x803)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 0x801)
    ds = _source(name, tmp_path, download=False)
    assert ds.train.images.shape == (30, 1, 28, 28) and ds.test.images.shape == (12, 1, 28, 28)
    assert ds.test.labels.tolist() == (np.arange(12) % 10).tolist()
    assert len(ds.classes) == 10 and ds.name == name


def test_mnist_without_files_or_download_says_where_to_put_them(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        _source("mnist", tmp_path, download=False)


def _cifar10(root, protocol):
    """Batches as the official files hold them: dicts of bytes keys, a uint8 array, lists."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {
            "batch_label": f"batch {i}",
            "data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            "labels": [i % 10] * 4,
            "filenames": [f"img_{i}_{k}.png".encode() for k in range(4)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reads_python_batches(tmp_path, protocol):
    _cifar10(tmp_path, protocol)
    ds = _source("cifar10", tmp_path, download=False)
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.test.images.shape == (4, 3, 32, 32)
    assert ds.test.labels.tolist() == [5] * 4 and ds.classes[0] == "c0"


class _Exploit:
    """What a crafted batches.meta does when a plain pickle.load reads it: runs `open`."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_cifar10_batch_that_would_run_code_is_refused_without_running_it(tmp_path):
    folder = _cifar10(tmp_path, 2)
    pwned = tmp_path / "pwned"
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": _Exploit(pwned)}, 2))
    with pytest.raises(DataError, match="refusing to load io.open") as err:
        _source("cifar10", tmp_path, download=False)
    assert "batches.meta" in str(err.value) and not pwned.exists()


def _imagefolder(root, n=10):
    root = root / "imgs"
    for cls, value in (("cat", 30), ("dog", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((6, 6, 3), value + i, np.uint8)).save(root / cls / f"{i}.png")


def test_imagefolder_reads_class_folders(tmp_path):
    _imagefolder(tmp_path)
    ds = _imagefolder_ds(tmp_path / "imgs", test_fraction=0.2)
    assert ds.classes == ["cat", "dog"]
    assert ds.train.images.shape == (16, 3, 6, 6) and len(ds.test.labels) == 4
    resized = _imagefolder_ds(tmp_path / "imgs", image_size=4)
    assert resized.train.images.shape[2:] == (4, 4)


def test_imagefolder_names_a_corrupted_file(tmp_path):
    _imagefolder(tmp_path)
    bad = tmp_path / "imgs" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        _imagefolder_ds(tmp_path / "imgs")


def test_datasets_that_need_files_say_so():
    with pytest.raises(DataError, match="data.source_dir"):
        _source("cifar10", None)


def test_16_bit_images_are_scaled_by_the_datasets_bit_depth_not_clipped(tmp_path):
    for cls, top in (("dim", 2048), ("bright", 4095)):  # 12-bit camera values in 16-bit PNGs
        (tmp_path / cls).mkdir()
        for i in range(5):
            values = np.full((4, 4), top - 8 * i, np.uint16)
            values[0, 0] = 0
            Image.fromarray(values).save(tmp_path / cls / f"{i}.png")
    assert Image.open(tmp_path / "dim" / "0.png").mode == "I;16"
    ds = _imagefolder_ds(tmp_path, test_fraction=0.2)
    images = np.concatenate([ds.train.images, ds.test.images])
    labels = np.concatenate([ds.train.labels, ds.test.labels])
    bright, dim = images[labels == 0], images[labels == 1]
    assert bright.max() == 255 and dim.max() == 128 and images.min() == 0  # 4095 >> 4, 2048 >> 4
    assert (images[:, :, 1:, 1:] < 255).mean() > 0.5  # not a wall of clipped 255s


def test_float_images_are_refused_with_the_file_named(tmp_path):
    _imagefolder(tmp_path)
    Image.fromarray(np.full((6, 6), 0.5, np.float32)).save(tmp_path / "imgs" / "cat" / "float.tif")
    with pytest.raises(DataError, match=r"float\.tif: a floating-point image"):
        _imagefolder_ds(tmp_path / "imgs")
