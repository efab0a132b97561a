"""`make up` on a fresh copy of the project: the DAG runs on its schedule, from the REST API and
when publish_dataset records a new data version; the runs show in the MLflow server; `make up`
twice is harmless; `make down` stops everything."""

import stat
import time
import urllib.error
from pathlib import Path

import pytest
import yaml

from tests.conftest import git, run
from tests.e2e.browser import SCREENSHOTS, airflow_dag, chromium, mlflow_compare
from tests.e2e.live import MAKE, Airflow, alive, http, mlflow_login, services

pytestmark = pytest.mark.slow
DAG = "train_image_classifier"


def _finished(runs: list[dict], count: int) -> bool:
    return len(runs) == count and all(r["state"] in ("success", "failed") for r in runs)


@pytest.mark.long
def test_scheduled_and_rest_triggered_runs_show_in_mlflow_then_down_stops_all(
    project, tmp_path, monkeypatch
):
    started_at = time.time()
    with services(project) as (ports, started):
        airflow = Airflow(project, ports["AIRFLOW_PORT"])
        mlflow = f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
        assert f"Airflow UI  {airflow.url}" in started and f"MLflow UI   {mlflow}" in started
        passwords = project / ".airflow" / "simple_auth_manager_passwords.json.generated"
        assert f"password: cat {passwords}" in started
        assert airflow.password not in started  # the login is pointed at, never printed
        login = mlflow_login(project)
        assert f"user admin, password: cat {project / '.mlflow-auth' / 'admin-password'}" in (
            started
        )
        logs = "".join(p.read_text() for p in (project / ".run").glob("*.log"))
        assert airflow.password not in logs and login[1] not in logs + started
        private = [project / ".run", project / ".mlflow-auth", project / ".mlflow",
                   project / ".airflow",
                   *(project / ".run").iterdir(),
                   *(project / ".mlflow-auth").iterdir(), project / ".airflow" / "airflow.db",
                   passwords]  # fmt: skip
        modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in private}
        assert set(modes.values()) <= {"0o600", "0o700"}, modes
        mlflow_argv = (project / ".run" / "mlflow.pid").read_text().strip()
        argv = (Path("/proc") / mlflow_argv / "cmdline").read_bytes().decode()
        assert "sqlite" not in argv and login[1] not in argv  # stores and secrets: not in ps

        # Nobody gets into the registry without the login: reading or moving the champion.
        for method, path, body in (
            ("GET", "registered-models/search", None),
            ("POST", "registered-models/create", {"name": "intruder"}),
            ("POST", "registered-models/alias", {"name": "image-classifier",
                                                 "alias": "champion", "version": "1"}),
        ):  # fmt: skip
            with pytest.raises(urllib.error.HTTPError) as refused:
                http(method, f"{mlflow}/api/2.0/mlflow/{path}", body)
            assert refused.value.code == 401, (path, refused.value.code)
        anonymous = run(["pipeline", "status"], project, False, env={"MLFLOW_TRACKING_URI": mlflow})
        assert "needs a login (401: no login was given); set MLFLOW_TRACKING_USERNAME" in (
            anonymous.stderr
        )
        assert anonymous.returncode == 1 and len(anonymous.stderr.strip().splitlines()) == 1

        airflow.wait_for_dag(DAG)
        airflow("PATCH", f"/dags/{DAG}", {"is_paused": False})  # -> a scheduled run
        triggered = airflow.trigger(DAG, {"epochs": 2, "optimizer": "sgd"})
        assert triggered["state"] == "queued"
        runs = airflow.wait_for_runs(DAG, lambda runs: _finished(runs, 2))
        states = {r["run_type"]: r["state"] for r in runs}
        assert states == {"scheduled": "success", "manual": "success"}, states

        model = http(
            "GET", f"{mlflow}/api/2.0/mlflow/registered-models/get?name=image-classifier",
            login=login,
        )  # fmt: skip
        aliases = {a["alias"] for a in model["registered_model"]["aliases"]}
        assert {"champion", "challenger"} <= aliases
        experiment = http(
            "GET",
            f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=image-classifier",
            login=login,
        )["experiment"]["experiment_id"]
        found = http(
            "POST",
            f"{mlflow}/api/2.0/mlflow/runs/search",
            {"experiment_ids": [experiment]},
            login=login,
        )["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in found]
        assert {t.get("airflow.run_id") for t in tags} == {r["dag_run_id"] for r in runs}
        # each DAG run put its passed validation on record, for train on any worker
        checks = [r for r in found if r["info"]["run_name"] == "validation-passed-digits"]
        assert len(checks) == len(runs)
        found = [r for r in found if r not in checks]
        # The admin's users: an analyst reads the registry but cannot move the champion.
        from mlflow.server import get_app_client

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", login[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", login[1])
        get_app_client("basic-auth", tracking_uri=mlflow).create_user(
            username="analyst", password="analyst-password-0123"
        )
        analyst = ("analyst", "analyst-password-0123")
        url = f"{mlflow}/api/2.0/mlflow/registered-models"
        assert http("GET", f"{url}/get?name=image-classifier", login=analyst)["registered_model"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            move = {"name": "image-classifier", "alias": "champion", "version": "1"}
            http("POST", f"{url}/alias", move, login=analyst)
        assert refused.value.code == 403

        optimizers = {
            p["value"]
            for r in found
            for p in r["data"]["params"]
            if p["key"] == "train.optimizer.name"
        }
        assert optimizers == {"adamw", "sgd"}  # the form's override reached the training run

        # Data-aware scheduling: publishing a new data version starts the training DAG.
        publish = "publish_dataset"
        airflow("PATCH", f"/dags/{publish}", {"is_paused": False})
        airflow.trigger(publish, {"test_fraction": 0.25})
        runs = airflow.wait_for_runs(
            DAG, lambda runs: _finished([r for r in runs if r["run_type"] == "asset_triggered"], 1)
        )
        assert [r["state"] for r in runs if r["run_type"] == "asset_triggered"] == ["success"]
        assert "test_fraction" not in (project / "data.dvc").read_text()  # only the md5 changed
        # the triggered run trained on the version the publish event handed on
        (triggered,) = [r["dag_run_id"] for r in runs if r["run_type"] == "asset_triggered"]
        published = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
        trained_on = http(
            "POST",
            f"{mlflow}/api/2.0/mlflow/runs/search",
            {"experiment_ids": [experiment], "filter": f"tags.`airflow.run_id` = '{triggered}'"},
            login=login,
        )["runs"]
        md5s = {t["value"] for r in trained_on for t in r["data"]["tags"] if t["key"] == "data.md5"}
        assert md5s == {published}
        assert git(project, "status", "--porcelain").strip() == "M data.dvc"  # left to commit

        # Seen in a browser: the two optimizers side by side, the DAG's last run succeeded.
        trained = {r["info"]["run_id"]: r["info"]["run_name"] for r in found}
        with chromium(tmp_path / "chromium-profile", login) as page:
            params = mlflow_compare(page, mlflow, experiment, trained)
            state, latest = airflow_dag(page, airflow.url, DAG, airflow.password)
        assert {"sgd", "adamw"} <= set(params.split())
        assert "train.optimizer.name" in params and "train.batch_size" not in params  # diff only
        newest = max(runs, key=lambda r: r["run_after"])["dag_run_id"]
        assert (state, latest) == ("success", f"/dags/{DAG}/runs/{newest}")
        assert (SCREENSHOTS / "mlflow-compare.png").stat().st_mtime > started_at

        again = run([*MAKE, "up"], project, env=ports).stdout
        assert again.count("already running") == 5
        pids = [int(p.read_text()) for p in (project / ".run").glob("*.pid")]
        assert len(pids) == 5 and all(alive(p) for p in pids)
        run([*MAKE, "down"], project, env=ports)
        time.sleep(1)
        assert not any(alive(p) for p in pids) and not list((project / ".run").glob("*.pid"))
