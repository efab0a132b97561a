"""Lineage round trip: register -> `pipeline lineage` -> `pipeline reproduce` gives the same
metrics on CPU; skip-unchanged decisions; a data version lost everywhere is a clear error."""

import json
import shutil

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from pipeline.data.versioning import pointer
from pipeline.settings import Settings
from tests.conftest import git, run

pytestmark = pytest.mark.slow


@pytest.fixture
def registered(from_template):
    """A champion trained by the CLI on digits (`train --set train.epochs=2`)."""
    return from_template("registered")


def _client(project) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")


def test_lineage_names_data_code_params_and_run(registered):
    project = registered
    shown = json.loads(run(["pipeline", "lineage", "image-classifier@champion"], project).stdout)
    assert shown["model"]["version"] == 1 and shown["model"]["aliases"] == [
        "challenger",
        "champion",
    ]
    assert shown["git"] == {"commit": git(project, "rev-parse", "HEAD").strip(), "dirty": False}
    assert shown["data"]["md5"] == pointer(project)["md5"] and shown["data"]["dataset"] == "digits"
    assert shown["data"]["train_rows"] + shown["data"]["test_rows"] == 1797
    cfg = load_config(project / "params.yaml", {"train.epochs": 2})
    assert shown["params"]["hash"] == cfg.params_hash()
    assert shown["validation"]["success"] and shown["validation"]["failed"] == 0
    assert set(shown["versions"]) == {"torch", "mlflow", "airflow", "dvc", "great_expectations"}
    assert shown["device"].startswith("cpu")
    assert shown["origin"] == "cli" and "airflow" not in shown  # a DAG run: {"airflow": ids}
    assert json.loads(run(["pipeline", "lineage", "image-classifier/1"], project).stdout) == shown

    # The same record is on the model version's tags, searchable without downloading anything.
    version = _client(project).get_model_version("image-classifier", "1")
    assert version.tags["data.md5"] == shown["data"]["md5"]
    assert version.tags["git.commit"] == shown["git"]["commit"]
    assert version.tags["validation.evaluated"] == str(shown["validation"]["evaluated"])
    assert version.tags["versions.torch"] == shown["versions"]["torch"]

    missing = run(["pipeline", "lineage", "image-classifier/9"], project, check=False)
    assert missing.returncode == 1 and "versions: 1" in missing.stderr


def test_reproduce_retrains_on_the_recorded_data_version_with_identical_metrics(registered):
    project = registered
    recorded = pointer(project)["md5"]
    # A newer data version in the checkout must not leak into the reproduction.
    images = np.load(project / "data" / "test_images.npy")
    images[0] = 0
    np.save(project / "data" / "test_images.npy", images)
    run(["dvc", "add", "data"], project)
    assert pointer(project)["md5"] != recorded
    before = (project / "data.dvc").read_text()

    out = run(["pipeline", "reproduce", "image-classifier/1"], project).stdout
    assert "REPRODUCED (tolerance 0)" in out and "weights: max |difference| 0" in out
    assert "test_accuracy" in out and "+0.00e+00" in out
    assert (project / "data.dvc").read_text() == before  # the checkout's data version untouched
    client = _client(project)
    (again,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`reproduce.of` = 'image-classifier/1'",
    )
    assert again.data.tags["data.md5"] == recorded
    assert again.data.tags["git.commit"] == git(project, "rev-parse", "HEAD").strip()


def test_a_data_version_gone_from_cache_and_remote_cannot_be_reproduced(registered):
    project = registered
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "dvc-storage")  # the default remote (.dvc/config: ../dvc-storage)
    lost = run(["pipeline", "reproduce", "image-classifier"], project, check=False)
    assert lost.returncode == 1
    assert "not in the local cache or the DVC remote" in lost.stderr


def test_skip_only_when_data_params_and_code_equal_the_champions(registered, monkeypatch):
    from pipeline.stages.skip import unchanged_stage

    project = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project}/.mlflow/mlflow.db")
    settings = Settings.from_env(project)
    md5 = pointer(project)["md5"]
    same = load_config(project / "params.yaml", {"train.epochs": 2})

    decision = unchanged_stage(same, settings, md5)
    assert decision["unchanged"] and decision["champion_version"] == 1

    other_params = load_config(project / "params.yaml", {"train.epochs": 3})
    assert unchanged_stage(other_params, settings, md5)["reason"] == (
        "not the same params hash as champion v1"
    )
    assert "data md5" in unchanged_stage(same, settings, "0" * 32 + ".dir")["reason"]

    # Code, not params.yaml: its values are in the params hash (and `dvc exp -S` rewrites it).
    code = project / "pipeline" / "stages" / "skip.py"
    code.write_text(code.read_text() + "\n")
    decision = unchanged_stage(same, settings, md5)
    assert not decision["unchanged"] and "uncommitted code changes" in decision["reason"]
    git(project, "commit", "-qam", "a new commit")
    assert "not the same git commit" in unchanged_stage(same, settings, md5)["reason"]
