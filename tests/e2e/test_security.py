"""What a name or a path from outside (the CLI, params.yaml, a trigger form) may reach: only
the project's own files, refused in one line before anything is written."""

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "cmd",
    [
        ["pipeline", "rollback", "../../../../../decoy"],
        ["pipeline", "promote", "../../../../../decoy/1", "--force", "--reason", "x"],
        ["pipeline", "register", "--set", "register.model_name=../../../../../decoy"],
        ["pipeline", "rollback", ".."],
    ],
)
def test_a_model_name_that_is_a_path_is_refused_before_any_file_is_touched(project, cmd):
    decoy = project.parent / "decoy.lock"  # where the lock of such a name would have been
    decoy.write_text("keep me")
    refused = run(cmd, project, check=False)
    assert refused.returncode == 2, refused.stderr
    assert "a model name is one word of a path" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert decoy.read_text() == "keep me"
    assert not (project / "outputs" / "locks").exists() or not any(
        (project / "outputs" / "locks").iterdir()
    )


def test_an_emptied_store_is_refused_and_a_locked_one_is_transient(project):
    run(["pipeline", "data", "pull"], project)
    store = project / ".mlflow" / "mlflow.db"
    store.parent.mkdir()
    store.write_bytes(b"")  # a registry truncated by a full disk or a bad copy
    for cmd in (["pipeline", "validate"], ["pipeline", "history", "image-classifier"]):
        refused = run(cmd, project, check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert "is an empty file (0 bytes): its registry and runs are gone" in refused.stderr
        assert store.stat().st_size == 0  # never re-created as a new, empty registry

    store.unlink()
    run(["pipeline", "validate"], project)  # a store with one experiment
    holder = sqlite3.connect(store)
    holder.execute("BEGIN EXCLUSIVE")  # another process in a long write
    try:
        refused = run(["pipeline", "history", "image-classifier"], project, check=False)
    finally:
        holder.rollback()
        holder.close()
    (line,) = refused.stderr.strip().splitlines()
    assert "stayed locked by another process" in line and "move it aside" not in line
    assert "no registered model" in run(["pipeline", "history", "image-classifier"], project,
                                        check=False).stderr  # fmt: skip


def test_the_registered_model_carries_no_code_and_altered_weights_are_refused(
    from_template, tmp_path
):
    from mlflow import MlflowClient

    project = from_template("registered")
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")
    version = client.get_model_version("image-classifier", "1")
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    served = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "m")))
    files = [p.relative_to(served) for p in served.rglob("*") if p.is_file()]
    assert not [f for f in files if f.suffix in (".py", ".pyc", ".pkl")], files  # no code
    assert "loader_module: pipeline.tracking.served" in (served / "MLmodel").read_text()
    model = Path(client.get_run(version.run_id).info.artifact_uri.removeprefix("file://"))

    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.uint8))
    out = tmp_path / "p.json"
    predict = ["pipeline", "predict", "--input", str(tmp_path / "x.npy"), "--output", str(out)]
    run(predict, project)  # the registered file: scored
    weights = model / "weights" / "model.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")  # the store changed after registration
    out.unlink()
    refused = run(predict, project, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "their sha256 is" in refused.stderr and "registered with the version" in refused.stderr
    assert not out.exists()
    gate = run(["pipeline", "promote", "image-classifier/1"], project, check=False)
    assert gate.returncode == 1 and "their sha256 is" in gate.stderr  # nor scored by the gate


def test_odd_model_names_are_refused_or_work_and_make_no_lock_for_an_unknown_model(project):
    for name in ("a" * 300, "x\u202ey"):  # too long for a file name; reads as another name
        refused = run(["pipeline", "rollback", name], project, check=False)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    for name in ("é-modèle", "with space", "-rf"):  # names MLflow takes: simply unknown here
        unknown = run(["pipeline", "rollback", "--", name], project, check=False)
        assert unknown.returncode == 1 and "no registered model" in unknown.stderr
    assert not list((project / "outputs").rglob("*.lock"))


def test_an_mlflow_server_that_refuses_this_host_name_says_which_name_to_allow(
    project, tmp_path, monkeypatch
):
    """MLflow 3's DNS-rebinding guard answers 403 to a Host header it was not told to allow,
    and /health is exempt: the workers of a deployment reach it by a name like `mlflow:5000`.
    The CLI and a DAG task fail at once, naming the flag and the host, instead of retrying."""
    import sys

    from mlflow import MlflowClient

    from tests.conftest import REPO
    from tests.e2e.live import MlflowServer

    allowed = {"MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow:5000"}  # not the name this client uses
    with MlflowServer(project, f"sqlite:///{tmp_path}/mlflow.db", env=allowed) as server:
        env = {**server.env, "MLFLOW_TRACKING_URI": server.url}
        host = server.url.removeprefix("http://")
        said = run(["pipeline", "status"], project, env=env, check=False)
        assert said.returncode == 1, said.stderr
        assert f"refused the Host header '{host}'" in said.stderr
        assert f"--allowed-hosts {host}" in said.stderr and "Traceback" not in said.stderr
        # a task meets it inside MLflow's client (no probe first): one line, no retry
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("PIPELINE_ROOT", str(project))
        monkeypatch.syspath_prepend(str(REPO / "dags"))
        # this project's dag_support, then the one other tests of this process imported
        saved = sys.modules.pop("dag_support", None)
        try:
            import dag_support
            from airflow.sdk.exceptions import AirflowFailException

            with pytest.raises(AirflowFailException, match=f"--allowed-hosts {host}"):
                with dag_support.permanent_errors():
                    MlflowClient(server.url).search_experiments()
        finally:
            sys.modules.pop("dag_support", None)
            if saved is not None:
                sys.modules["dag_support"] = saved


@pytest.mark.parametrize(
    "url, says",
    [
        ("mysql://admin:s3cret@db/registry", "the promotion lock needs a PostgreSQL URL"),
        ("postgresql://admin:s3cret@127.0.0.1:1/registry", "cannot be reached"),
    ],
)
def test_a_registry_lock_that_cannot_be_used_is_one_line_naming_the_setting(
    from_template, url, says
):
    project = from_template("registered")
    env = {"PIPELINE_REGISTRY_LOCK_URI": url}
    said = run(["pipeline", "rollback", "image-classifier"], project, env=env, check=False)
    assert said.returncode == 2 and said.stderr.count("\n") == 1, said.stderr
    assert "PIPELINE_REGISTRY_LOCK_URI" in said.stderr and says in said.stderr
    assert "s3cret" not in said.stderr  # never the password
