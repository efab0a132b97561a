"""Dataset sources read each dataset's real on-disk format, and digits is byte-for-byte stable."""

import gzip
import hashlib
import pickle
import struct
import tarfile

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
    """An IDX file as the database ships it (gzip-compressed when the name ends in .gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    body = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(body) if path.name.endswith(".gz") else body)


def _mnist_files(folder, sep="-", gz="", n=(30, 12)):
    rng = np.random.default_rng(0)
    for prefix, count in zip(("train", "t10k"), n, strict=True):
        images = rng.integers(0, 256, (count, 28, 28))
        _idx(folder / f"{prefix}-images{sep}idx3-ubyte{gz}", images, 0x803)
        _idx(folder / f"{prefix}-labels{sep}idx1-ubyte{gz}", np.arange(count) % 10, 0x801)
    return folder


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("sep", ["-", "."])
@pytest.mark.parametrize("gz", ["", ".gz"])
@pytest.mark.parametrize("raw", ["", "MNIST/raw"])
def test_mnist_files_are_read_as_distributed_and_nothing_is_written_beside_them(
    tmp_path, sep, gz, raw
):
    source = tmp_path / "src"
    _mnist_files(source / raw, sep, gz)
    before = _tree(source)
    ds = _source("mnist", source, download_dir=str(tmp_path / "cache"))
    assert ds.train.images.shape == (30, 1, 28, 28) and ds.test.images.shape == (12, 1, 28, 28)
    assert ds.test.labels.tolist() == (np.arange(12) % 10).tolist()
    assert ds.classes[0] == "0 - zero" and len(ds.classes) == 10
    assert _tree(source) == before and not (tmp_path / "cache").exists()


def test_the_same_files_compressed_or_not_make_the_same_dataset(tmp_path):
    plain = _source("mnist", _mnist_files(tmp_path / "a"), download=False)
    packed = _source("mnist", _mnist_files(tmp_path / "b", ".", ".gz"), download=False)
    assert np.array_equal(plain.train.images, packed.train.images)
    assert np.array_equal(plain.test.labels, packed.test.labels)


def test_fashion_mnist_reads_its_own_folder_and_class_names(tmp_path):
    _mnist_files(tmp_path / "FashionMNIST" / "raw")
    ds = _source("fashion_mnist", tmp_path, download=False)
    assert ds.name == "fashion_mnist" and ds.classes[-1] == "Ankle boot"


def test_missing_mnist_files_are_listed_with_what_was_found(tmp_path):
    _mnist_files(tmp_path / "src")
    (tmp_path / "src" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as err:
        _source("mnist", tmp_path / "src")  # download on: still never into source_dir
    said = str(err.value)
    assert "found train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte" in said
    assert "missing t10k-labels-idx1-ubyte" in said and "data.source_dir" in said
    assert _tree(tmp_path / "src") == [
        "t10k-images-idx3-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]


def test_mnist_without_source_dir_or_download_names_both_fixes(tmp_path):
    with pytest.raises(DataError, match=r"set data.source_dir \(or allow data.download\)"):
        _source("mnist", None, download=False, download_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda b: b[:-100], "cut short"),
        (lambda b: b"\0\0\x0d\x03" + b[4:], "not an IDX file of unsigned bytes"),
        (lambda b: b"", "not an IDX file"),
    ],
)
def test_a_damaged_idx_file_is_named(tmp_path, damage, said):
    path = _mnist_files(tmp_path) / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=said) as err:
        _source("mnist", tmp_path, download=False)
    assert "train-images-idx3-ubyte" in str(err.value)


def test_a_truncated_gzip_is_named(tmp_path):
    path = _mnist_files(tmp_path, gz=".gz") / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: cannot be read"):
        _source("mnist", tmp_path, download=False)


def _cifar10(root, protocol):
    """Batches as the official files hold them: dicts of bytes keys, a uint8 array, lists."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
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


def test_cifar10_is_read_from_its_folder_itself_or_its_archive_unextracted(tmp_path):
    folder = _cifar10(tmp_path / "a", 2)
    expected = _source("cifar10", tmp_path / "a", download=False)
    assert np.array_equal(_source("cifar10", folder).train.images, expected.train.images)
    (tmp_path / "b").mkdir()
    with tarfile.open(tmp_path / "b" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_archive = _source("cifar10", tmp_path / "b")
    assert np.array_equal(from_archive.train.images, expected.train.images)
    assert from_archive.classes == expected.classes
    assert _tree(tmp_path / "b") == ["cifar-10-python.tar.gz"]  # nothing extracted beside it
    named = _source("cifar10", tmp_path / "b" / "cifar-10-python.tar.gz")  # the archive itself
    assert np.array_equal(named.test.images, expected.test.images)


def test_missing_cifar10_batches_are_listed(tmp_path):
    folder = _cifar10(tmp_path, 2)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="found batches.meta, data_batch_1") as err:
        _source("cifar10", tmp_path)
    assert "Needed:" in str(err.value) and "test_batch" in str(err.value)


def _rewrite_batch(folder, name, change):
    batch = pickle.loads((folder / name).read_bytes())
    (folder / name).write_bytes(pickle.dumps(change(batch), protocol=2))


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            lambda b: b | {"labels": b["labels"][:-1]},
            "data_batch_2: it holds 4 images but 3 labels",
        ),
        (
            lambda b: b | {"labels": [10] * 4},
            r"data_batch_2: it has label 10 \(10 classes: 0-9 only\)",
        ),
        (lambda b: b | {"labels": [-1] * 4}, "data_batch_2: it has label -1"),
        (lambda b: b | {"data": b["data"] * 300.0}, "data_batch_2: its data is float64"),
        (
            lambda b: b | {"data": b["data"][:, :3000]},
            r"data_batch_2: its data has shape \(4, 3000\)",
        ),
        (lambda b: {k: v for k, v in b.items() if k != "labels"}, "data_batch_2 has no 'labels'"),
    ],
)
def test_a_cifar10_batch_whose_parts_do_not_pair_up_is_refused_with_the_file_named(
    tmp_path, change, said
):
    _rewrite_batch(_cifar10(tmp_path, 2), "data_batch_2", change)
    with pytest.raises(DataError, match=said):
        _source("cifar10", tmp_path, download=False)


def test_cifar10_batches_with_bytes_keys_read_the_same(tmp_path):
    folder = _cifar10(tmp_path, 2)
    expected = _source("cifar10", tmp_path, download=False)
    for name in ["batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        _rewrite_batch(folder, name, lambda b: {k.encode(): v for k, v in b.items()})
    again = _source("cifar10", tmp_path, download=False)
    assert again.classes == expected.classes
    assert np.array_equal(again.train.labels, expected.train.labels)
    (folder / "batches.meta").write_bytes(pickle.dumps({"num_vis": 3072}, protocol=2))
    with pytest.raises(DataError, match="batches.meta has no 'label_names'"):
        _source("cifar10", tmp_path, download=False)


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


def test_datasets_that_need_files_say_so(tmp_path):
    with pytest.raises(DataError, match="data.source_dir"):
        _source("cifar10", None, download=False, download_dir=str(tmp_path))


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
