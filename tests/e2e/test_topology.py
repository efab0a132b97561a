"""The production topology on this machine: Airflow's metadata DB on PostgreSQL, CeleryExecutor on
Redis with an `airflow celery worker`, the MLflow server on PostgreSQL with its own artifact store.
The DAG is triggered through the REST API and its model is read back through the MLflow server."""

from pathlib import Path

import psycopg2
import pytest
import redis

from tests.conftest import free_port
from tests.e2e.live import Airflow, http, mlflow_login, services

pytestmark = [pytest.mark.slow, pytest.mark.integration]
DAG = "train_image_classifier"
POSTGRES = "postgres@127.0.0.1:5432"


@pytest.fixture
def broker():
    """An empty Redis database for the Celery queue, emptied again afterwards."""
    for index in range(1, 16):
        db = redis.Redis(host="127.0.0.1", port=6379, db=index)
        if db.dbsize() == 0:
            break
    else:
        pytest.fail("no empty Redis database (1-15) for the Celery broker")
    try:
        yield f"redis://127.0.0.1:6379/{index}"
    finally:
        db.flushdb()
        db.close()


@pytest.mark.long
def test_celery_on_redis_with_postgres_runs_the_dag_to_a_registered_model(
    project: Path, tmp_path: Path, new_database, broker
):
    airflow_db, mlflow_db = new_database("airflow"), new_database("mlflow")
    artifact_store = tmp_path / "artifact-store"
    mlflow_port = str(free_port())
    env = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{POSTGRES}/{airflow_db}",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": broker,
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{POSTGRES}/{airflow_db}",
        "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://{POSTGRES}/{mlflow_db}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(artifact_store),
        "MLFLOW_PORT": mlflow_port,
        "PIPELINE_SCHEDULE": "none",  # only the run the test triggers
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",  # tasks log through the server
        "MLFLOW_ARTIFACT_ROOT": "mlflow-artifacts:/",  # which stores artifacts for them
    }
    with services(project, env) as (env, started):
        assert "worker: started" in started
        mlflow = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
        airflow = Airflow(project, env["AIRFLOW_PORT"])
        airflow.wait_for_dag(DAG)
        airflow("PATCH", f"/dags/{DAG}", {"is_paused": False})
        manual = airflow.trigger(DAG, {"epochs": 1})["dag_run_id"]
        runs = airflow.wait_for_runs(
            DAG, lambda runs: runs and runs[0]["state"] in ("success", "failed")
        )
        instances = airflow("GET", f"/dags/{DAG}/dagRuns/{manual}/taskInstances")["task_instances"]
        states = [(r["dag_run_id"], r["state"]) for r in runs]
        assert states == [(manual, "success")], [(t["task_id"], t["state"]) for t in instances]

        # Every task ran on the Celery worker, which took it from the Redis queue.
        worker_log = (project / ".run" / "worker.log").read_text()
        assert f".> transport:   {broker}" in worker_log
        executed = [
            line for line in worker_log.splitlines() if "Executing workload in Celery" in line
        ]
        from pipeline.stages import graph

        tasks = {t["task_id"]: t["state"] for t in instances}
        around = {"check_data", "skip_if_unchanged", "peer_nodes", "train_peer"}
        assert set(tasks) == {*graph.BY_NAME, *around}
        assert tasks["train_peer"] == "skipped"  # one machine: mapped over no other
        for task in (t for t in instances if t["task_id"] != "train_peer"):
            where = f"run_id={manual}/task_id={task['task_id']}/"
            assert any(where in line for line in executed), task["task_id"]

        # The metadata lives in PostgreSQL, not in a SQLite file.
        assert not (project / ".airflow" / "airflow.db").exists()
        with psycopg2.connect(f"postgresql://{POSTGRES}/{airflow_db}") as conn, conn.cursor() as c:
            c.execute("SELECT state FROM dag_run WHERE run_id = %s", (manual,))
            assert c.fetchone() == ("success",)

        # The model, through the MLflow server's registry; its files in the server's store.
        login = mlflow_login(project)  # the tasks logged in with it, from the environment
        model = http(
            "GET", f"{mlflow}/api/2.0/mlflow/registered-models/get?name=image-classifier",
            login=login,
        )  # fmt: skip
        aliases = {a["alias"]: a["version"] for a in model["registered_model"]["aliases"]}
        assert aliases["challenger"] == "1"  # one epoch: registered, below the promotion floor
        version = http(
            "GET",
            f"{mlflow}/api/2.0/mlflow/model-versions/get?name=image-classifier&version=1",
            login=login,
        )["model_version"]
        assert {"key": "registration.status", "value": "complete"} in version["tags"]
        run = http(
            "GET", f"{mlflow}/api/2.0/mlflow/runs/get?run_id={version['run_id']}", login=login
        )["run"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["airflow.run_id"] == manual
        assert list(artifact_store.rglob("model_card.md"))
        assert not (project / ".mlflow").exists()  # nothing fell back to the local SQLite store
        with psycopg2.connect(f"postgresql://{POSTGRES}/{mlflow_db}") as conn, conn.cursor() as c:
            c.execute("SELECT count(*) FROM model_versions")
            assert c.fetchone()[0] >= 1
