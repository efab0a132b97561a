"""DVC integrity: a fresh clone regenerates the tracked version; bad or missing data is handled."""

import shutil

import numpy as np
import pytest
import yaml

from pipeline.data import DataError, check_data, materialize
from pipeline.data.versioning import recorded_md5
from tests.conftest import git


def _pull(project):
    return materialize("digits", project, project / "data", log=lambda _: None)


def test_fresh_clone_regenerates_exactly_the_committed_version(project):
    committed = recorded_md5(project)
    assert _pull(project) == committed
    assert git(project, "status", "--porcelain") == ""  # data.dvc rewritten byte-identical
    assert check_data("digits", project, project / "data")["data_md5"] == committed
    assert _pull(project) == committed  # second pull: nothing to do


def test_hand_edited_data_is_refused_with_both_fixes(project):
    _pull(project)
    labels_file = project / "data" / "train_labels.npy"
    labels = np.load(labels_file)
    labels[0] = (labels[0] + 1) % 10
    np.save(labels_file, labels)
    with pytest.raises(DataError) as err:
        check_data("digits", project, project / "data")
    message = str(err.value)
    assert "train_labels.npy" in message and "does not match data.dvc" in message
    assert "dvc checkout" in message and "dvc add data" in message


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
    md5 = materialize(
        "imagefolder", project, project / "data", tmp_path / "imgs", log=lambda _: None
    )
    assert (
        md5 != before
        and yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"] == md5
    )
    assert "data.dvc" in git(project, "status", "--porcelain")
