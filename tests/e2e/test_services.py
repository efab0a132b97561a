"""`make up` on a fresh copy of the project: the DAG runs on its schedule, from the REST API and
when publish_dataset records a new data version; the runs show in the MLflow server; `make up`
twice is harmless; `make down` stops everything."""

import json
import os
import shutil
import socket
import time
import urllib.request

import pytest

from tests.conftest import BIN, REPO, git, run

pytestmark = pytest.mark.slow
DAG = "train_image_classifier"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body=None, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, headers, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def services(project):
    for name in ("Makefile", "pyproject.toml", "requirements.lock", "scripts"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, project / name)
    (project / ".venv").symlink_to(BIN.parent)
    git(project, "add", "-A")
    git(project, "commit", "-qm", "services")
    ports = {"AIRFLOW_PORT": str(_free_port()), "MLFLOW_PORT": str(_free_port())}
    make = ["make", "-o", ".venv/.installed"]
    try:
        yield project, ports, run([*make, "up"], project, env=ports, timeout=300).stdout
    finally:
        run([*make, "down"], project, env=ports, check=False)


def test_scheduled_and_rest_triggered_runs_show_in_mlflow_then_down_stops_all(services):
    project, ports, started = services
    airflow = f"http://127.0.0.1:{ports['AIRFLOW_PORT']}"
    mlflow = f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
    assert f"Airflow UI  {airflow}" in started and f"MLflow UI   {mlflow}" in started
    passwords = project / ".airflow" / "simple_auth_manager_passwords.json.generated"
    assert f"password: cat {passwords}" in started
    password = json.loads(passwords.read_text())["admin"]
    assert password not in started  # the login is pointed at, never printed

    token = _http("POST", f"{airflow}/auth/token", {"username": "admin", "password": password})
    token = token["access_token"]
    for _ in range(60):  # until the dag-processor has parsed the DAG
        try:
            _http("GET", f"{airflow}/api/v2/dags/{DAG}", token=token)
            break
        except OSError:
            time.sleep(2)
    _http("PATCH", f"{airflow}/api/v2/dags/{DAG}", {"is_paused": False}, token)  # -> scheduled run
    triggered = _http(
        "POST",
        f"{airflow}/api/v2/dags/{DAG}/dagRuns",
        {"logical_date": None, "conf": {"epochs": 2}},
        token,
    )
    assert triggered["state"] == "queued"
    deadline = time.monotonic() + 480
    while time.monotonic() < deadline:
        runs = _http("GET", f"{airflow}/api/v2/dags/{DAG}/dagRuns", token=token)["dag_runs"]
        states = {r["run_type"]: r["state"] for r in runs}
        if set(states.values()) <= {"success", "failed"} and len(states) == 2:
            break
        time.sleep(5)
    assert states == {"scheduled": "success", "manual": "success"}, states

    model = _http("GET", f"{mlflow}/api/2.0/mlflow/registered-models/get?name=image-classifier")
    aliases = {a["alias"] for a in model["registered_model"]["aliases"]}
    assert {"champion", "challenger"} <= aliases
    experiment = _http(
        "GET", f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=image-classifier"
    )["experiment"]["experiment_id"]
    found = _http("POST", f"{mlflow}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment]})
    logged = {
        t["value"] for r in found["runs"] for t in r["data"]["tags"] if t["key"] == "airflow.run_id"
    }
    assert logged == {r["dag_run_id"] for r in runs}  # both DAG runs, seen through the server

    # Data-aware scheduling: publishing a new data version starts the training DAG.
    publish = "publish_dataset"
    _http("PATCH", f"{airflow}/api/v2/dags/{publish}", {"is_paused": False}, token)
    _http(
        "POST",
        f"{airflow}/api/v2/dags/{publish}/dagRuns",
        {"logical_date": None, "conf": {"test_fraction": 0.25}},
        token,
    )
    deadline = time.monotonic() + 480
    while time.monotonic() < deadline:
        runs = _http("GET", f"{airflow}/api/v2/dags/{DAG}/dagRuns", token=token)["dag_runs"]
        by_data = [r for r in runs if r["run_type"] == "asset_triggered"]
        if by_data and by_data[0]["state"] in ("success", "failed"):
            break
        time.sleep(5)
    assert [r["state"] for r in by_data] == ["success"], runs
    assert "test_fraction" not in (project / "data.dvc").read_text()  # only the md5 changed
    assert git(project, "status", "--porcelain").strip() == "M data.dvc"  # left to commit

    make = ["make", "-o", ".venv/.installed"]
    again = run([*make, "up"], project, env=ports).stdout
    assert again.count("already running") == 5
    pids = [int(p.read_text()) for p in (project / ".run").glob("*.pid")]
    assert len(pids) == 5 and all(_alive(p) for p in pids)
    run([*make, "down"], project, env=ports)
    time.sleep(1)
    assert not any(_alive(p) for p in pids) and not list((project / ".run").glob("*.pid"))
