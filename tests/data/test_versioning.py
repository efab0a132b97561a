"""DVC integrity: a fresh clone regenerates the tracked version; bad or missing data is handled."""

import gzip
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import DataError, check_data, materialize
from pipeline.data.store import read_meta
from pipeline.data.versioning import CHECKOUT_FIX, PENDING, recorded_md5
from tests.conftest import git, run


def _pull(project):
    return materialize("digits", project, project / "data", log=lambda _: None)


def test_fresh_clone_regenerates_exactly_the_committed_version(project):
    committed = recorded_md5(project)
    assert _pull(project) == committed
    assert git(project, "status", "--porcelain") == ""  # data.dvc rewritten byte-identical
    assert check_data("digits", project, project / "data")["data_md5"] == committed
    assert _pull(project) == committed  # second pull: nothing to do


def _edit_a_label(project):
    labels_file = project / "data" / "train_labels.npy"
    labels = np.load(labels_file)
    labels[0] = (labels[0] + 1) % 10
    np.save(labels_file, labels)


def test_hand_edited_data_is_refused_with_both_fixes_that_work_as_printed(project):
    committed = _pull(project)
    _edit_a_label(project)
    with pytest.raises(DataError) as err:
        check_data("digits", project, project / "data")
    message = str(err.value)
    assert "train_labels.npy" in message and "does not match data.dvc" in message
    assert f"`{CHECKOUT_FIX}`" in message and "`dvc add data && git commit data.dvc`" in message
    run(CHECKOUT_FIX.split(), project)
    assert check_data("digits", project, project / "data")["data_md5"] == committed
    _edit_a_label(project)
    run(["bash", "-c", "dvc add data && git commit -qm 'edited label' data.dvc"], project)
    assert check_data("digits", project, project / "data")["data_md5"] != committed


def test_a_verdict_is_reused_only_while_data_and_data_dvc_are_untouched(project, monkeypatch):
    from pipeline.data import versioning

    committed = _pull(project)
    asked = []
    compare = versioning.differences
    monkeypatch.setattr(versioning, "differences", lambda root: asked.append(1) or compare(root))
    data = project / "data"
    monkeypatch.setattr(versioning, "RACY_S", 3600)  # every file "just changed": never trusted
    assert versioning.verify(project, data) == versioning.verify(project, data) == committed
    assert len(asked) == 2
    monkeypatch.setattr(versioning, "RACY_S", 0)  # the pull's writes have settled
    assert versioning.verify(project, data) == versioning.verify(project, data) == committed
    assert len(asked) == 3  # the same state: DVC was not asked again
    assert versioning.verify_started(project, data)() == committed and len(asked) == 3
    _edit_a_label(project)  # the same size, a new mtime
    with pytest.raises(DataError, match="train_labels.npy"):
        versioning.verify(project, data)
    assert len(asked) == 4


def test_missing_data_is_pulled_from_the_remote(project):
    md5 = _pull(project)
    assert (project / "dvc-storage").is_dir()
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    assert check_data("digits", project, project / "data")["data_md5"] == md5
    assert (project / "data" / "meta.json").exists()


def test_missing_everywhere_is_a_clear_error(project):
    _pull(project)
    for path in ("data", ".dvc/cache", "dvc-storage"):
        shutil.rmtree(project / path)
    with pytest.raises(DataError, match="not in the local cache or the DVC remote"):
        check_data("digits", project, project / "data")


def test_data_of_another_dataset_than_configured_is_refused(project):
    _pull(project)
    with pytest.raises(DataError, match="holds 'digits' but base.dataset is 'mnist'"):
        check_data("mnist", project, project / "data")


def test_new_dataset_becomes_a_new_version(project, tmp_path):
    from PIL import Image

    _pull(project)
    before = recorded_md5(project)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((4, 4), i * 40 + (cls == "b"), np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    data = DataConfig(source_dir=str(tmp_path / "imgs"))
    md5 = materialize("imagefolder", project, project / "data", data, log=lambda _: None)
    assert (
        md5 != before
        and yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"] == md5
    )
    assert "data.dvc" in git(project, "status", "--porcelain")


def _pull_with(project, dataset="digits", source=None, **settings):
    data = DataConfig(source_dir=source and str(source), **settings)
    return materialize(dataset, project, project / "data", data, log=lambda _: None)


def _classes(root, names, value=0):
    from PIL import Image

    for cls in names:
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((20, 20), value + 40 * i, np.uint8)).save(
                root / cls / f"{i}.png"
            )
    return root


def test_changed_settings_write_a_new_version_and_unchanged_ones_do_nothing(project):
    committed = _pull(project)
    half = _pull_with(project, test_fraction=0.5)
    meta = read_meta(project / "data")
    assert half != committed and recorded_md5(project) == half
    assert meta["recipe"]["test_fraction"] == 0.5 and meta["splits"]["test"] > 850
    assert _pull_with(project, test_fraction=0.5) == half  # same settings: a no-op
    shutil.rmtree(project / "data")  # DVC would bring back the 0.5 version; the pull rewrites it
    assert _pull(project) == committed and read_meta(project / "data")["splits"]["test"] == 359


def test_imagefolder_source_and_size_changes_are_not_ignored(project, tmp_path):
    a, b = _classes(tmp_path / "A", ["x", "y"]), _classes(tmp_path / "B", ["p", "q", "r"], 3)
    first = _pull_with(project, "imagefolder", a, image_size=16)
    second = _pull_with(project, "imagefolder", b, image_size=16)
    meta = read_meta(project / "data")
    assert second != first and meta["source"] == str(b) and meta["classes"] == ["p", "q", "r"]
    _pull_with(project, "imagefolder", b, image_size=8)
    assert read_meta(project / "data")["shape"] == [1, 8, 8]


def test_a_pull_killed_before_dvc_add_is_finished_by_the_next_pull(project):
    _pull(project)
    stale = project / ".data-k1ll3d"  # what a pull killed while writing leaves behind
    stale.mkdir()
    (stale / "train_images.npy").write_bytes(b"half")
    killer = (
        "import os, signal, sys\n"
        "from pipeline.data import versioning\n"
        "versioning.add = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from pipeline.cli import main\n"
        "sys.exit(main(['data', 'pull', '--set', 'data.test_fraction=0.5']))\n"
    )
    killed = run([sys.executable, "-c", killer], project, check=False)
    assert killed.returncode == -signal.SIGKILL
    with pytest.raises(DataError, match="interrupted `pipeline data pull`") as err:
        check_data("digits", project, project / "data")
    assert "run `pipeline data pull` again" in str(err.value)
    again = run(["pipeline", "data", "pull", "--set", "data.test_fraction=0.5"], project)
    assert "finishing a `pipeline data pull` that was interrupted" in again.stdout
    md5 = json.loads(again.stdout.strip().splitlines()[-1])["data_md5"]
    assert check_data("digits", project, project / "data")["data_md5"] == md5
    assert read_meta(project / "data")["recipe"]["test_fraction"] == 0.5
    assert not list(project.glob(".data-*")) and not (project / PENDING).exists()


def _photos(root, classes, n, start=0):
    from PIL import Image

    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + n):
            pixels = np.random.default_rng([ord(cls[0]), i]).integers(0, 256, (12, 12), np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def test_a_changed_source_folder_is_a_new_version_that_says_what_changed(project, tmp_path):
    source = _photos(tmp_path / "photos", ["a", "b"], 10)
    said = []

    def pull(**settings):
        data = DataConfig(source_dir=str(source), image_size=8, **settings)
        return materialize("imagefolder", project, project / "data", data, log=said.append)

    first = pull()
    assert pull() == first and "already at the tracked version" in said[-1]
    _photos(source, ["a", "b"], 10, start=10)
    _photos(source, ["c"], 10)
    second = pull()
    assert second != first and read_meta(project / "data")["classes"] == ["a", "b", "c"]
    assert (
        "source: +30 files, 'a': 10 -> 20 files, 'b': 10 -> 20 files, "
        "new folder 'c' (10 files)" in "\n".join(said)
    )
    (source / "b" / "3.png").write_bytes((source / "a" / "3.png").read_bytes())  # replaced
    (source / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: no part of the content
    third = pull()
    assert third != second and "(source: 'b': files replaced or changed); rewriting" in said[-3]
    _photos(source / "a", ["2021"], 2)  # a sub-folder of a class belongs to it
    (source / "README.md").write_text("where these came from\n")  # beside the class folders
    assert pull() != third
    assert "(source: +3 files, top level: 0 -> 1 files, new folder 'a/2021' (2 files))" in said[-3]
    assert read_meta(project / "data")["skipped"] == [
        {"path": "README.md", "reason": "not inside a class folder"}
    ]

    (source / "a" / "0.png").write_bytes(b"")  # a pull refused on a bad image writes nothing
    with pytest.raises(DataError, match="cannot read image"):
        pull()
    (source / "a" / "0.png").unlink()
    said.clear()
    pull()
    assert not any("interrupted" in line for line in said)
    rewritten = run(
        ["pipeline", "data", "pull", "--dataset", "imagefolder", "--source-dir", str(source)]
        + ["--set", "data.image_size=8", "--rewrite"],
        project,
    ).stdout
    assert "writing imagefolder" in rewritten and "identical to the tracked version" in rewritten


def test_mnist_as_distributed_is_pulled_and_a_failed_pull_is_not_called_interrupted(
    project, tmp_path
):
    from tests.data.test_sources import _mnist_files, _tree

    source = _mnist_files(tmp_path / "mnist", sep=".", n=(60, 20))  # the dotted names, flat
    (source / "t10k-labels.idx1-ubyte").rename(tmp_path / "aside")
    before = _tree(source)
    said = []

    def pull():
        data = DataConfig(source_dir=str(source), download_dir=str(tmp_path / "cache"))
        return materialize("mnist", project, project / "data", data, log=said.append)

    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        pull()
    assert _tree(source) == before and not (project / PENDING).exists()
    (tmp_path / "aside").rename(source / "t10k-labels.idx1-ubyte")
    md5 = pull()
    assert not any("interrupted" in line for line in said)
    assert any(line == f"data: writing mnist to {project / 'data'}" for line in said)
    assert check_data("mnist", project, project / "data")["splits"] == {"train": 60, "test": 20}
    assert md5 == recorded_md5(project) and not (tmp_path / "cache").exists()
    # The same files elsewhere, gzip-compressed and under torchvision's folders: the same version
    moved = tmp_path / "elsewhere" / "MNIST" / "raw"
    moved.mkdir(parents=True)
    for f in source.iterdir():
        (moved / f"{f.name.replace('.idx', '-idx')}.gz").write_bytes(gzip.compress(f.read_bytes()))
    source = tmp_path / "elsewhere"
    assert pull() == md5 and said[-1] == f"data: mnist already at the tracked version {md5}"


HOLD_DVC_LOCK = (
    "import sys, time\n"
    "from dvc.lock import Lock\n"
    "lock = Lock(sys.argv[1])\n"
    "lock.lock()\n"
    "print('held', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "lock.unlock()\n"
)


def _hold_dvc_lock(project, seconds: float) -> subprocess.Popen:
    """Another DVC command in the project, holding its repository lock for `seconds`."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DVC_LOCK, str(project / ".dvc" / "tmp" / "lock"), str(seconds)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_dvc_lock_is_waited_for_then_named_and_data_stays_in_step(project, tmp_path):
    _pull(project)
    before = {p.name: p.read_bytes() for p in (project / "data").iterdir()}
    pointer = (project / "data.dvc").read_text()
    source = tmp_path / "photos"
    for c, value in (("a", 40), ("b", 200)):
        (source / c).mkdir(parents=True)
        for i in range(30):
            Image.new("L", (8, 8), value + i).save(source / c / f"{i}.png")
    pull = ["pipeline", "data", "pull", "--dataset", "imagefolder", "--source-dir", str(source)]

    holder = _hold_dvc_lock(project, 30)
    try:
        held = run(pull, project, check=False, env={"PIPELINE_DVC_LOCK_WAIT_S": "2"})
    finally:
        holder.kill()
        holder.wait()
    assert held.returncode == 1 and "Traceback" not in held.stderr
    (line,) = held.stderr.strip().splitlines()
    assert "another DVC command holds the repository lock" in line
    assert "PIPELINE_DVC_LOCK_WAIT_S" in line
    # Nothing was swapped: data/ and data.dvc are the tracked version, nothing left to finish.
    assert {p.name: p.read_bytes() for p in (project / "data").iterdir()} == before
    assert (project / "data.dvc").read_text() == pointer
    assert not (project / PENDING).exists()

    holder = _hold_dvc_lock(project, 4)  # a short command: waited for, then the pull goes on
    pulled = run(pull, project)
    holder.wait()
    assert "new version" in pulled.stderr + pulled.stdout
    assert read_meta(project / "data")["name"] == "imagefolder"


def test_a_held_dvc_lock_is_not_called_a_missing_version(project):
    _pull(project)
    shutil.rmtree(project / "data")  # in the local cache: a pull would bring it back
    holder = _hold_dvc_lock(project, 30)
    try:
        held = run(["pipeline", "validate"], project, check=False,
                   env={"PIPELINE_DVC_LOCK_WAIT_S": "2"})  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert held.returncode == 1
    assert "another DVC command holds the repository lock" in held.stderr
    assert "not in the local cache" not in held.stderr
    run(["pipeline", "validate"], project)  # the lock gone: pulled from the cache
