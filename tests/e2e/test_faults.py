"""Faults and bad inputs around a registered model end in one line that names the problem and
the fix, never a traceback or a wrong answer, and leave nothing half-written behind."""

import os
import re
import shutil

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from pipeline.data.versioning import pointer
from pipeline.settings import Settings
from pipeline.stages.skip import unchanged_stage
from tests.conftest import fill_disk, run
from tests.templates import copy_project, template, trained_run

pytestmark = pytest.mark.slow
NAME = "image-classifier"


@pytest.fixture(scope="module")
def registered(templates, tmp_path_factory):
    """A project with digits validated and a 2-epoch model registered as champion v1, shared by
    the tests that leave it as they found it."""
    source = template(templates, "registered")
    return copy_project(source, tmp_path_factory.mktemp("faults") / "project")


def _fails(cmd, project, rc=1, env=None, timeout=600):
    result = run(cmd, project, check=False, env=env, timeout=timeout)
    assert result.returncode == rc, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr


def test_predict_refuses_inputs_the_model_cannot_score_and_writes_nothing(registered, tmp_path):
    pixels = np.load(registered / "data" / "test_images.npy")[:6]
    nan = pixels.astype(np.float32)
    nan[2, 0, 1, 1] = np.nan
    cases = {
        "scaled": (pixels / 255.0, "looks scaled to 0..1"),
        "nan": (nan, "1 NaN/Inf values (first in image 2)"),
        "empty": (pixels[:0], "holds no images"),
        "wide": (pixels.astype(np.int32) * 4, "the model takes pixels in 0..255"),
        "bool": (pixels > 0, "holds bool values"),
    }
    for name, (array, message) in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
        out = tmp_path / f"{name}.csv"
        cmd = [
            "pipeline",
            "predict",
            "--input",
            str(tmp_path / f"{name}.npy"),
            "--output",
            str(out),
        ]
        assert message in _fails(cmd, registered), name
        assert not out.exists() and not list(tmp_path.glob(f".{name}.csv.*.tmp")), name

    np.save(tmp_path / "good.npy", pixels.astype(np.float32))  # floats on the 0..255 scale: fine
    stale = tmp_path / ".good.csv.5e1f3a9b2c4d.tmp"
    stale.write_text("what a killed predict left")
    os.utime(stale, (0, 0))  # left long ago: unlocked and old, so the next write removes it
    good = ["pipeline", "predict", "--input", str(tmp_path / "good.npy")]
    run([*good, "--output", str(tmp_path / "good.csv")], registered)
    assert len((tmp_path / "good.csv").read_text().splitlines()) == 7 and not stale.exists()


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(registered, small_disk, tmp_path):
    outputs = registered / "outputs"  # moved onto the small disk, which then fills up
    shutil.copytree(outputs, small_disk / "outputs")
    shutil.rmtree(outputs)
    outputs.symlink_to(small_disk / "outputs")
    try:
        before = (outputs / "validation.json").read_text()
        fill_disk(small_disk)
        line = _fails(["pipeline", "validate"], registered)
        assert "disk full" in line and str(small_disk) in line
        assert (outputs / "validation.json").read_text() == before
        assert not list(outputs.glob(".validation.json.*.tmp"))

        np.save(tmp_path / "x.npy", np.load(registered / "data" / "test_images.npy")[:3])
        out = small_disk / "x.csv"
        cmd = ["pipeline", "predict", "--input", str(tmp_path / "x.npy"), "--output", str(out)]
        assert f"disk full writing {out}" in _fails(cmd, registered)
        assert not out.exists() and not list(small_disk.glob(".x.csv.*.tmp"))
    finally:  # the other tests of this module share the project
        (small_disk / "filler").unlink(missing_ok=True)
        outputs.unlink()
        shutil.copytree(small_disk / "outputs", outputs)


def test_unknown_model_names_list_the_registered_ones(registered):
    expected = f"no registered model 'nosuch'; registered models: {NAME}"
    for cmd in (
        ["pipeline", "history", "nosuch"],
        ["pipeline", "rollback", "nosuch"],
        ["pipeline", "lineage", "nosuch"],
        ["pipeline", "predict", "--model", "nosuch", "--input", "x.npy"],
    ):
        assert expected in _fails(cmd, registered), cmd


def test_cuda_without_a_gpu_is_a_config_error(registered):
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}  # hides any GPU, so this holds on a GPU machine too
    cmd = ["pipeline", "train", "--set", "train.device=cuda"]
    stderr = _fails(cmd, registered, rc=2, env=no_gpu)
    assert "train.device is cuda but no CUDA device is visible" in stderr


def test_an_mlflow_server_that_is_down_is_said_at_once_and_waited_for_boundedly(registered):
    from tests.conftest import free_port

    down = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "PIPELINE_MLFLOW_WAIT_S": "3"}
    # MLflow's own retries alone take about 4 minutes: the timeout fails the test if they run.
    stderr = _fails(["pipeline", "status"], registered, env=down, timeout=60)
    first, *_, last = stderr.strip().splitlines()
    assert "not reachable" in first and "retrying until" in first
    assert "did not answer for 3 s" in last and "nothing was changed" in last


def test_deleted_runs_and_a_corrupt_store_are_named_with_the_fix(from_template, monkeypatch):
    registered = from_template("registered")  # its own: this test deletes and corrupts
    run_id = trained_run(registered)
    (artifacts,) = registered.glob(f".mlflow/artifacts/*/{run_id}/artifacts")
    shutil.rmtree(artifacts)
    np.save(registered / "x.npy", np.load(registered / "data" / "test_images.npy")[:3])
    for cmd in (["pipeline", "predict", "--input", "x.npy"], ["pipeline", "lineage", NAME]):
        stderr = _fails(cmd, registered)
        assert f"run {run_id} cannot be read from MLflow" in stderr
        assert "the run or its artifacts were deleted" in stderr

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{registered}/.mlflow/mlflow.db"}
    run(["mlflow", "runs", "delete", "--run-id", run_id], registered)
    run(["mlflow", "gc", "--backend-store-uri", env["MLFLOW_TRACKING_URI"]], registered)
    assert "(run deleted)" in run(["pipeline", "status"], registered).stdout
    validated = run(["pipeline", "validate"], registered).stdout
    assert "drift not checked: the run of champion v1 was deleted" in validated
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])  # the DAG's skip check:
    md5 = pointer(registered)["md5"]  # a champion without its run is never "unchanged"
    cfg = load_config(registered / "params.yaml", {"train.epochs": 2})
    decision = unchanged_stage(cfg, Settings.from_env(registered), md5)
    assert decision == {"unchanged": False, "reason": "the run of champion v1 was deleted"}

    (registered / ".mlflow" / "mlflow.db").write_bytes(os.urandom(4096))
    stderr = _fails(["pipeline", "status"], registered)
    assert (
        "cannot be read (file is not a database)" in stderr and "restore it from a backup" in stderr
    )


def test_a_deleted_experiment_or_run_and_a_duplicated_param_are_one_line_each(from_template):
    project = from_template("registered")  # its own: this test deletes its experiment
    tracking = f"sqlite:///{project}/.mlflow/mlflow.db"
    (experiment,) = MlflowClient(tracking).search_experiments(filter_string=f"name = '{NAME}'")
    run(["mlflow", "experiments", "delete", "--experiment-id", experiment.experiment_id], project)
    for stage in (["validate"], ["train", "--set", "train.epochs=1"]):
        stderr = _fails(["pipeline", *stage], project)
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert f"the MLflow experiment '{NAME}' was deleted" in stderr
    assert "--set tracking.experiment=NAME" in stderr
    _printed_fix(
        stderr, project, f"mlflow experiments restore --experiment-id {experiment.experiment_id}"
    )
    assert "validation passed" in run(["pipeline", "validate"], project).stdout
    run_id = trained_run(project)  # a run deleted in the UI: evaluating it says so, once
    run(["mlflow", "runs", "delete", "--run-id", run_id], project)
    stderr = _fails(["pipeline", "evaluate", "--run-id", run_id], project)
    assert f"run {run_id} was deleted in MLflow" in stderr and len(stderr.splitlines()) == 1
    _printed_fix(stderr, project, f"mlflow runs restore --run-id {run_id}")
    run(["pipeline", "evaluate", "--run-id", run_id], project)

    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  epochs: 12\n", "  epochs: 12\n  epochs: 3\n"))
    stderr = _fails(["pipeline", "validate"], project, rc=2)
    assert stderr.startswith("config error: ") and "key 'epochs' is written twice" in stderr
    assert len(stderr.strip().splitlines()) == 1


def _printed_fix(stderr: str, project, command: str) -> None:
    """Run the command the error printed, in a shell whose MLflow points elsewhere: it must
    name the pipeline's store itself."""
    (printed,) = re.findall(r"`(MLFLOW_TRACKING_URI=\S+ " + re.escape(command) + ")`", stderr)
    run(["bash", "-c", printed], project, env={"MLFLOW_TRACKING_URI": "file:///nonexistent"})


def test_a_full_dvc_remote_is_one_line_and_the_version_stays_recorded(project, small_disk):
    run(["dvc", "remote", "modify", "local", "url", str(small_disk / "remote")], project)
    fill_disk(small_disk)
    refused = run(["pipeline", "data", "pull"], project, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    (line,) = [ln for ln in refused.stderr.splitlines() if not ln.startswith(("WARNING", "md5"))]
    assert "is recorded in data.dvc and the local cache, but storing it in the DVC remote" in line
    assert "No space left on device" in line and "run `dvc push`" in line
    (small_disk / "filler").unlink()
    pushed = run(["dvc", "push"], project)  # the fix the line names finishes it
    assert "pushed" in pushed.stdout + pushed.stderr
    assert run(["pipeline", "data", "pull"], project).returncode == 0
