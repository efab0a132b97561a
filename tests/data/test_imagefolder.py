"""A folder of photos to data/: both layouts, every image mode, odd sizes and the resize policies,
unreadable files refused or skipped on record, the same bytes with any worker count, and a pull
killed mid-write leaving data/ as it was."""

import hashlib
import json
import signal
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig, ValidateConfig
from pipeline.data import DataError, materialize
from pipeline.data.sources import write_source
from pipeline.data.store import read_dataset, read_meta
from pipeline.data.validation import validate_dataset
from tests.conftest import run


def _photo(path, size=(48, 40), seed=0, mode="RGB", fmt=None):
    """A smooth gradient with a little noise: what JPEG is made for."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, np.full((h, w), seed * 37 % 256)], -1)
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).convert(mode).save(path, fmt)
    return path


def _folder(root, classes=("cat", "dog"), n=6, size=(48, 40)):
    for c, name in enumerate(classes):
        for i in range(n):
            _photo(root / name / f"{i}.jpg", size, seed=10 * c + i)
    return root


def _ingest(root, out, **data):
    write_source("imagefolder", DataConfig(source_dir=str(root), **data), out)
    return read_dataset(out)


def _md5s(folder):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_imagenet_layout_keeps_its_train_val_split(tmp_path):
    _folder(tmp_path / "imgs" / "train", n=5)
    _folder(tmp_path / "imgs" / "val", n=2)
    ds = _ingest(tmp_path / "imgs", tmp_path / "data", image_size=16)
    assert ds.classes == ["cat", "dog"]
    assert len(ds.train.labels) == 10 and len(ds.test.labels) == 4  # the folders', not 80/20
    assert ds.test.labels.tolist() == [0, 0, 1, 1]
    _photo(tmp_path / "imgs" / "val" / "bird" / "0.jpg")
    with pytest.raises(DataError, match=r"val has classes \['bird'\]"):
        _ingest(tmp_path / "imgs", tmp_path / "data2", image_size=16)


def test_every_image_mode_converts_to_the_datasets_mode(tmp_path):
    root = _folder(tmp_path / "imgs", n=4)
    _photo(root / "cat" / "cmyk.jpg", mode="CMYK")
    _photo(root / "cat" / "rgba.png", mode="RGBA")
    _photo(root / "dog" / "palette.gif", mode="P")
    _photo(root / "dog" / "gray.png", mode="L")
    Image.fromarray(np.full((40, 48), 4095, np.uint16)).save(root / "dog" / "deep.png")
    assert Image.open(root / "dog" / "deep.png").mode == "I;16"
    ds = _ingest(root, tmp_path / "data", image_size=16)
    images = np.concatenate([ds.train.images, ds.test.images])
    assert images.shape == (13, 3, 16, 16) and images.dtype == np.uint8
    assert images.max() == 255  # the 16-bit image scaled by its 12 bits, not clipped to white


def test_resize_policies_crop_squash_and_pad(tmp_path):
    stripes = np.zeros((20, 40, 3), np.uint8)  # 40 wide: red | green (middle half) | blue
    stripes[:, :10, 0] = stripes[:, 10:30, 1] = stripes[:, 30:, 2] = 255
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(stripes).save(root / cls / f"{i}.png")
    crop = _ingest(root, tmp_path / "crop", image_size=10, test_fraction=0.5).train.images[0]
    squash = _ingest(root, tmp_path / "squash", image_size=10, resize="squash", test_fraction=0.5)
    pad = _ingest(root, tmp_path / "pad", image_size=10, resize="pad", test_fraction=0.5)
    assert crop[1].min() > 200 and crop[0].max() < 60  # the center: green only
    squashed = squash.train.images[0]
    assert squashed[0, :, 0].min() > 200 and squashed[2, :, -1].min() > 200  # all three kept
    padded = pad.train.images[0]
    assert padded[:, :2].max() == 0 and padded[:, -2:].max() == 0  # black bars above and below
    assert padded[1, 5, 5] > 200  # the picture in the middle


def test_odd_sizes_need_an_image_size(tmp_path):
    root = _folder(tmp_path / "imgs", n=3)
    _photo(root / "dog" / "wide.jpg", size=(90, 30))
    with pytest.raises(DataError, match=r"wide\.jpg is 90x30, others 48x40.*data.image_size"):
        _ingest(root, tmp_path / "data")
    assert _ingest(root, tmp_path / "data", image_size=24).shape == (3, 24, 24)


def test_unreadable_files_fail_by_name_or_are_skipped_on_record(tmp_path):
    root = _folder(tmp_path / "imgs", n=6)
    whole = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "dog" / "corrupt.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match=r"cannot read image .*(corrupt\.png|truncated\.jpg)"):
        _ingest(root, tmp_path / "data", image_size=16)
    assert not (tmp_path / "data").exists()
    ds = _ingest(root, tmp_path / "data", image_size=16, on_bad_image="skip")
    assert len(ds.train.labels) + len(ds.test.labels) == 12  # the two bad files left out
    skipped = read_meta(tmp_path / "data")["skipped"]
    assert [s["path"] for s in skipped] == ["cat/truncated.jpg", "dog/corrupt.png"]
    assert all(s["reason"] for s in skipped)
    cfg = ValidateConfig(min_rows_per_split=2, drift_max_shift=None)
    report = validate_dataset(ds, read_meta(tmp_path / "data"), cfg, tmp_path / "gx")
    assert report.skipped == 2 and "2 files were left out" in report.describe()


def test_the_same_folder_gives_the_same_bytes_with_one_or_two_workers(tmp_path):
    root = _folder(tmp_path / "imgs", n=70)  # more than one batch of files per worker
    _photo(root / "dog" / "odd.jpg", size=(64, 30))
    one = tmp_path / "one"
    _ingest(root, one, image_size=16, workers=1)
    _ingest(root, tmp_path / "two", image_size=16, workers=2)
    assert _md5s(one) == _md5s(tmp_path / "two")


def test_a_pull_killed_mid_write_leaves_data_as_it_was(project, tmp_path):
    materialize("digits", project, project / "data", log=lambda _: None)
    before = _md5s(project / "data")
    root = _folder(tmp_path / "imgs", n=70)
    killer = (
        "import os, signal, sys\n"
        "from pipeline.data import store\n"
        "append = store.DatasetWriter.append\n"
        "calls = []\n"
        "def dying(self, *a):\n"
        "    calls.append(1)\n"
        "    append(self, *a)\n"
        "    if len(calls) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "store.DatasetWriter.append = dying\n"
        "from pipeline.cli import main\n"
        f"sys.exit(main(['data', 'pull', '--dataset', 'imagefolder', '--source-dir', {str(root)!r},"
        " '--set', 'data.image_size=16', '--set', 'data.workers=1']))\n"
    )
    killed = run([sys.executable, "-c", killer], project, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert _md5s(project / "data") == before  # the old version, whole
    again = run(
        [
            "pipeline",
            "data",
            "pull",
            "--dataset",
            "imagefolder",
            "--source-dir",
            str(root),
            "--set",
            "data.image_size=16",
        ],
        project,
    )
    assert json.loads(again.stdout.strip().splitlines()[-1])["data_md5"]
    assert read_meta(project / "data")["name"] == "imagefolder"
    assert not list(project.glob(".data-*"))


def test_links_are_never_followed_and_each_is_listed_with_where_it_points(project, tmp_path):
    root = _folder(tmp_path / "imgs", n=6)
    (root / "cat" / "loop").symlink_to(root / "cat")  # a loop: cat/loop/loop/...
    (root / "cat" / "dogs").symlink_to(root / "dog")  # another class's images
    (root / "cat" / "again.jpg").symlink_to(root / "cat" / "0.jpg")  # one image twice
    (root / "cat" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # dangling
    outside = _folder(tmp_path / "elsewhere", classes=("more",), n=2) / "more"
    (root / "dog" / "more").symlink_to(outside)  # photos kept elsewhere on the machine
    (root / "dog" / "secret.jpg").symlink_to(outside / "0.jpg")  # one file from elsewhere
    (root / "kitten").symlink_to(root / "cat")  # a class under a second name
    (root / "bird").symlink_to(outside)  # a whole class from elsewhere
    (root / "dog" / "l1.jpg").symlink_to(root / "dog" / "l2.jpg")  # a loop of two links
    (root / "dog" / "l2.jpg").symlink_to(root / "dog" / "l1.jpg")
    pull = ["pipeline", "data", "pull", "--dataset", "imagefolder", "--source-dir", str(root)]
    run([*pull, "--set", "data.test_fraction=0.25"], project)
    meta = read_meta(project / "data")
    ds = read_dataset(project / "data")
    counts = np.bincount(np.concatenate([ds.train.labels, ds.test.labels]))
    assert meta["classes"] == ["cat", "dog"] and counts.tolist() == [6, 6]
    skipped = {s["path"]: s["reason"] for s in meta["skipped"]}
    assert set(skipped) == {
        "cat/loop", "cat/dogs", "cat/again.jpg", "cat/gone.jpg", "dog/more", "dog/secret.jpg",
        "kitten", "bird", "dog/l1.jpg", "dog/l2.jpg",
    }  # fmt: skip
    assert skipped["dog/l1.jpg"] == f"a link loop (to {root / 'dog' / 'l2.jpg'})"
    assert f"a link to {root / 'cat'}: inside the source folder" in skipped["cat/loop"]
    assert f"a link to {root / 'cat'}: inside the source folder" in skipped["kitten"]
    assert f"a link to {root / 'dog'}: inside" in skipped["cat/dogs"]
    assert "dangling link" in skipped["cat/gone.jpg"]
    assert f"a link to {root / 'cat' / '0.jpg'}: inside" in skipped["cat/again.jpg"]
    for name in ("dog/more", "dog/secret.jpg", "bird"):
        assert "outside the source folder, never read; copy it in (`cp -rL`)" in skipped[name]


@pytest.mark.slow  # 300 large JPEGs to write first: the full suite, not the inner loop
def test_ingest_memory_stays_far_below_the_decoded_size(tmp_path):
    """300 photos of 1024x768 decode to 700 MB; written at 32x32 they take 1 MB. The process
    that decodes them (one worker: this one) must hold a few images, not the folder. VmHWM,
    not ru_maxrss: a child's ru_maxrss starts at its parent's (this test process's) size."""
    root = tmp_path / "imgs"
    for i in range(300):
        _photo(root / f"c{i % 2}" / f"{i}.jpg", size=(1024, 768), seed=i)
    code = (
        "from pathlib import Path\n"
        "from pipeline.config import DataConfig\n"
        "from pipeline.data.sources import write_source\n"
        f"data = DataConfig(source_dir={str(root)!r}, image_size=32, workers=1)\n"
        f"write_source('imagefolder', data, Path({str(tmp_path / 'data')!r}))\n"
        "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')]\n"
        "print(int(hwm[0].split()[1]) // 1024)\n"
    )
    peak_mb = int(run([sys.executable, "-c", code], tmp_path).stdout.split()[-1])
    assert peak_mb < 250, f"ingest peaked at {peak_mb} MB"
    assert read_dataset(tmp_path / "data").shape == (3, 32, 32)
