"""The production topology across hosts that share no disk, as infra/ ships it: a control host
(PostgreSQL of its own, Redis, an S3 server, the MLflow server with proxied artifacts, the Airflow
api-server, scheduler, dag-processor and triggerer) and two Celery workers, each with its own
clone and nothing else (tests/e2e/hosts.py builds them with Linux namespaces). The clones take
infra/dvc-config as their DVC config, as the image does. The training DAG runs through the REST
API; a worker is lost during `train` and the retry resumes on the other in the same MLflow run; a
publish on one worker trains the new version on every task; a run with nodes=2 trains on both
workers as two machines, and resumes in step after one machine's ranks are killed."""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import BIN, REPO, fresh_clone, git
from tests.e2e.hosts import CONTROL_IP, Hosts
from tests.e2e.live import Airflow

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.long]
DAG = "train_image_classifier"
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/nonexistent"))
SECRETS = {"AWS_ACCESS_KEY_ID": "pipeline", "AWS_SECRET_ACCESS_KEY": "pipeline-secret"}
# What every host gets, as the compose file's x-airflow-env does (names resolve to the control
# host through each host's /etc/hosts).
SHARED = {
    **SECRETS,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL_S3": "http://s3:9000",
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://postgres@postgres:5432/airflow",
    "AIRFLOW__CELERY__BROKER_URL": "redis://redis:6379/0",
    "AIRFLOW__CELERY__RESULT_BACKEND": "db+postgresql+psycopg2://postgres@postgres:5432/airflow",
    "AIRFLOW__API_AUTH__JWT_SECRET": "a-test-jwt-secret-shared-by-every-host",
    "AIRFLOW__API__SECRET_KEY": "a-test-api-secret-shared-by-every-host",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://control:8080/execution/",
    "AIRFLOW__LOGGING__REMOTE_LOGGING": "True",
    "AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER": "s3://airflow-logs",
    "AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID": "pipeline_s3",
    "AIRFLOW_CONN_PIPELINE_S3": '{"conn_type": "aws"}',
    # a lost worker's task is failed after 20 s without a heartbeat (Airflow's default: 5 min)
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    "MLFLOW_ARTIFACT_ROOT": "mlflow-artifacts:/",
    "PIPELINE_REGISTRY_LOCK_URI": "postgresql://postgres@postgres:5432/mlflow",
    "PIPELINE_SCHEDULE": "none",
    "PIPELINE_TRAIN_QUEUE": "training",  # the tasks of training on several machines
    "GPU_SLOTS": "2",  # airflow-init's gpu pool: one slot per training machine
    "GX_ANALYTICS_ENABLED": "false",
}


def _env(folder: Path) -> dict:
    """A host's environment: the shared settings, its own clone and Airflow home."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "AWS"))}
    return {
        **keep,
        **SHARED,
        "PATH": f"{BIN}{os.pathsep}{keep.get('PATH', '')}",
        "PIPELINE_ROOT": str(folder),
        "AIRFLOW_HOME": str(folder / ".airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(folder / "dags"),
    }


def _wait(what: str, ready, seconds: int = 120, every: float = 1.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = ready()
        except Exception:  # not up yet
            found = None
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"{what} not ready after {seconds} s")


def _clone(folder: Path) -> Path:
    """A host's own checkout, with the image's DVC config (an S3 remote, no local path)."""
    clone = fresh_clone(folder)
    shutil.copy2(REPO / "infra" / "dvc-config", clone / ".dvc" / "config")
    git(clone, "commit", "-qam", "the image's DVC config")
    return clone


def _control_services(hosts: Hosts, clone: Path, scratch: Path) -> None:
    """PostgreSQL, Redis, S3 (moto), the MLflow server and Airflow's control components."""
    import boto3
    import psycopg2

    pgdata = scratch / "pg"
    pgdata.mkdir()
    shutil.chown(pgdata, "postgres", "postgres")
    initdb = ["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(pgdata)]
    hosts.run("control", [*initdb, "-U", "postgres", "--auth=trust"], os.environ, scratch)
    with (pgdata / "pg_hba.conf").open("a") as hba:  # the hosts' network, as trust (a test)
        hba.write("host all all 10.77.0.0/24 trust\n")
    env, logs = _env(clone), clone / "logs"
    logs.mkdir()
    postgres = [
        str(PG_BIN / "postgres"),
        "-D",
        str(pgdata),
        "-p",
        "5432",
        "-c",
        f"listen_addresses={CONTROL_IP}",
        "-c",
        f"unix_socket_directories={pgdata}",
    ]
    hosts.start(
        "control",
        ["runuser", "-u", "postgres", "--", *postgres],
        env,
        scratch,
        logs / "postgres.log",
    )
    redis = [
        "redis-server",
        "--bind",
        CONTROL_IP,
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    hosts.start("control", redis, env, scratch, logs / "redis.log")
    hosts.start(
        "control",
        [str(BIN / "moto_server"), "-H", CONTROL_IP, "-p", "9000"],
        env,
        scratch,
        logs / "s3.log",
    )
    admin = _wait(
        "PostgreSQL", lambda: psycopg2.connect(host=CONTROL_IP, user="postgres", dbname="postgres")
    )
    admin.autocommit = True
    with admin.cursor() as cursor:
        for db in ("airflow", "mlflow"):
            cursor.execute(f"CREATE DATABASE {db}")
    admin.close()
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://{CONTROL_IP}:9000",
        region_name="us-east-1",
        aws_access_key_id=SECRETS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"],
    )
    _wait("S3", lambda: s3.list_buckets() is not None)
    for bucket in ("mlflow", "dvc", "airflow-logs"):  # the compose file's minio-buckets
        s3.create_bucket(Bucket=bucket)
    mlflow = {
        **env,
        "MLFLOW_S3_ENDPOINT_URL": "http://s3:9000",
        "MLFLOW_SERVER_ALLOWED_HOSTS": f"mlflow:5000,{CONTROL_IP}:5000",  # the workers', ours
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://postgres@postgres:5432/mlflow",
    }
    server = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "0.0.0.0",
        "--port",
        "5000",
        "--workers",
        "1",
        "--artifacts-destination",
        "s3://mlflow",
    ]
    hosts.start("control", server, mlflow, scratch, logs / "mlflow.log")
    init = hosts.run("control", ["bash", str(REPO / "scripts" / "airflow-init.sh")], env, clone)
    assert init.returncode == 0, init.stderr[-3000:]
    for part in (
        ["api-server", "--host", "0.0.0.0", "--port", "8080"],
        ["scheduler"],
        ["dag-processor"],
        ["triggerer"],
    ):
        hosts.start("control", [str(BIN / "airflow"), *part], env, clone, logs / f"{part[0]}.log")
    _wait("MLflow", lambda: MlflowClient(f"http://{CONTROL_IP}:5000").search_experiments(), 180)


def _worker(hosts: Hosts, name: str, clone: Path):
    """A Celery worker serving the default queue and the training queue, one task at a time."""
    queues = ["--queues", f"default,{SHARED['PIPELINE_TRAIN_QUEUE']}"]
    command = [str(BIN / "airflow"), "celery", "worker", *queues, "--concurrency", "1"]
    return hosts.start(name, command, _env(clone), clone, clone / f"worker-{name}.log")


def _task(airflow: Airflow, run_id: str, task: str) -> dict:
    return airflow("GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task}")


def _runs_of(client: MlflowClient, dag_run: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`airflow.run_id` = '{dag_run}'")


def _logged_epochs(client: MlflowClient, dag_run: str) -> int:
    """Epochs the training run of `dag_run` has logged so far."""
    runs = [r for r in _runs_of(client, dag_run) if "train.identity" in r.data.tags]
    return len(client.get_metric_history(runs[0].info.run_id, "train_loss")) if runs else 0


def _finished(airflow: Airflow, dag_run: str) -> str:
    """The state `dag_run` ended in (success or failed)."""
    runs = airflow.wait_for_runs(
        DAG,
        lambda runs: any(
            r["dag_run_id"] == dag_run and r["state"] in ("success", "failed") for r in runs
        ),
        900,
    )
    return next(r["state"] for r in runs if r["dag_run_id"] == dag_run)


def test_the_shipped_topology_runs_across_hosts_that_share_no_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("building hosts needs root (network namespaces); CI runs as root")
    scratch = Path(tempfile.mkdtemp(prefix="hosts-", dir="/tmp"))  # PostgreSQL's user enters
    scratch.chmod(0o755)
    clones = {name: _clone(tmp_path / name) for name in ("control", "w1", "w2")}
    try:
        with Hosts(["w1", "w2"]) as hosts:
            _control_services(hosts, clones["control"], scratch)
            # The first data version, published from the control host's clone to the S3 remote;
            # the workers' clones hold only data.dvc.
            pulled = hosts.run(
                "control", ["pipeline", "data", "pull"], _env(clones["control"]), clones["control"]
            )
            assert pulled.returncode == 0, pulled.stderr[-3000:]
            workers = {w: _worker(hosts, w, clones[w]) for w in ("w1", "w2")}
            airflow = _wait(
                "the api-server", lambda: Airflow(clones["control"], "8080", CONTROL_IP), 180
            )
            client = MlflowClient(f"http://{CONTROL_IP}:5000")
            _lose_a_worker_during_train(hosts, airflow, client, clones, workers)
            _publish_on_one_worker_trains_it_everywhere(hosts, airflow, client, clones)
            _two_workers_train_as_two_machines(hosts, airflow, client, clones)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _lose_a_worker_during_train(hosts, airflow, client, clones, workers) -> None:
    """A worker lost in `train` (all its processes killed): the retry runs on the other worker,
    resumes the same MLflow run from the checkpoint uploaded to it, and leaves no orphan."""
    airflow.wait_for_dag(DAG)
    airflow("PATCH", f"/dags/{DAG}", {"is_paused": False})
    epochs = 8
    dag_run = airflow.trigger(DAG, {"model": "cnn", "epochs": epochs})["dag_run_id"]
    train = _wait(
        "train running",
        lambda: (
            _task(airflow, dag_run, "train")["state"] == "running"
            and _task(airflow, dag_run, "train")
        ),
        600,
    )
    lost = train["hostname"]
    assert lost in ("w1", "w2"), train

    _wait("two epochs logged", lambda: _logged_epochs(client, dag_run) >= 2, 300, 0.2)
    hosts.lose(lost)
    lost_at, done_before = time.monotonic(), _logged_epochs(client, dag_run)
    state = _finished(airflow, dag_run)
    retried = _task(airflow, dag_run, "train")
    assert state == "success", (state, retried)
    survivor = {"w1": "w2", "w2": "w1"}[lost]
    assert retried["try_number"] == 2 and retried["hostname"] == survivor
    (trained,) = [r for r in _runs_of(client, dag_run) if "train.identity" in r.data.tags]
    assert trained.info.status == "FINISHED"
    resumed_from = int(trained.data.tags["train.resumed_from_epoch"])
    steps = sorted(m.step for m in client.get_metric_history(trained.info.run_id, "train_loss"))
    assert steps == list(range(1, epochs + 1))  # every epoch logged once, in one run
    assert not client.list_artifacts(trained.info.run_id, "checkpoint")  # removed once logged
    running = client.search_runs([trained.info.experiment_id], "attributes.status = 'RUNNING'")
    assert running == []  # no orphan
    # validate's Data Docs reached the training run through MLflow, whatever host ran it
    assert "data_docs/index.html" in {
        a.path for a in client.list_artifacts(trained.info.run_id, "data_docs")
    }
    history = client.get_metric_history(trained.info.run_id, "system/epoch_seconds")
    first_resumed = min(m.timestamp for m in history if m.step == resumed_from + 1) / 1000
    print(
        f"worker {lost} lost after epoch {done_before}; the retry on {survivor} resumed after "
        f"epoch {resumed_from} (redone: {done_before - resumed_from}); its first epoch was "
        f"logged {first_resumed - (time.time() - (time.monotonic() - lost_at)):.0f} s after "
        "the loss"
    )
    # Every finished task's log reads through the api-server, those of the lost worker too
    # (from S3), and the workers ran the run's tasks between them.
    tasks = airflow("GET", f"/dags/{DAG}/dagRuns/{dag_run}/taskInstances")["task_instances"]
    ran = {t["hostname"] for t in tasks if t["state"] == "success"}
    assert survivor in ran and ran <= {"w1", "w2"}, tasks
    for task in (t for t in tasks if t["state"] == "success"):
        path = f"/dags/{DAG}/dagRuns/{dag_run}/taskInstances/{task['task_id']}"
        log = airflow("GET", f"{path}/logs/{task['try_number']}")
        text = json.dumps(log["content"])
        assert log["content"] and "Could not read" not in text and "error" not in text[:300], (
            task["task_id"],
            task["hostname"],
            text[:1500],
        )
    workers[lost] = _worker(hosts, lost, clones[lost])  # back, with its disk as it was


def _publish_on_one_worker_trains_it_everywhere(hosts, airflow, client, clones) -> None:
    """publish_dataset writes a new version on one worker's disk and the S3 remote; the run it
    triggers checks that version out on whatever worker runs each task."""
    publish = "publish_dataset"
    airflow.wait_for_dag(publish)
    airflow("PATCH", f"/dags/{publish}", {"is_paused": False})
    published_run = airflow.trigger(publish, {"test_fraction": 0.25})["dag_run_id"]
    runs = airflow.wait_for_runs(
        DAG,
        lambda runs: any(
            r["run_type"] == "asset_triggered" and r["state"] in ("success", "failed") for r in runs
        ),
        900,
    )
    (triggered,) = [r for r in runs if r["run_type"] == "asset_triggered"]
    assert triggered["state"] == "success", triggered
    path = f"/dags/{publish}/dagRuns/{published_run}/taskInstances/publish"
    published = airflow("GET", path)
    value = airflow("GET", f"{path}/xcomEntries/return_value")["value"]
    md5 = (json.loads(value) if isinstance(value, str) else value)["data_md5"]
    original = git(clones["control"], "show", "HEAD:data.dvc")
    assert md5 not in original and published["state"] == "success"
    recorded = {r.data.tags.get("data.md5") for r in _runs_of(client, triggered["dag_run_id"])}
    assert recorded == {md5}  # validation and training alike


def _two_workers_train_as_two_machines(hosts, airflow, client, clones) -> None:
    """A run with nodes=2: train on one worker opens the rendezvous, train_peer on the other
    joins it, one MLflow run. The peer's ranks killed after an epoch fail both tasks; their
    retries meet again and resume that run in step, every epoch logged once."""
    import psutil

    epochs = 4
    conf = {"model": "cnn", "epochs": epochs, "nodes": 2}
    dag_run = airflow.trigger(DAG, conf)["dag_run_id"]
    peer_path = f"/dags/{DAG}/dagRuns/{dag_run}/taskInstances/train_peer/0"

    def both_running():
        tasks = _task(airflow, dag_run, "train"), airflow("GET", peer_path)
        return all(t["state"] == "running" for t in tasks) and tasks

    leader, peer = _wait("train and train_peer running", both_running, 600)
    assert {leader["hostname"], peer["hostname"]} == {"w1", "w2"}

    _wait("an epoch logged", lambda: _logged_epochs(client, dag_run) >= 1, 300, 0.2)
    ranks = [
        p
        for p in psutil.process_iter(["cmdline", "cwd"])
        if "pipeline.stages.nodes" in (p.info["cmdline"] or [])
        and p.info["cwd"] == str(clones[peer["hostname"]])
    ]
    assert ranks, "no rank of the peer's training found"
    for rank in ranks:
        rank.kill()
    killed_at, done_before = time.time(), _logged_epochs(client, dag_run)
    state = _finished(airflow, dag_run)
    tasks = _task(airflow, dag_run, "train"), airflow("GET", peer_path)
    assert state == "success", tasks
    assert [t["try_number"] for t in tasks] == [2, 2], tasks  # both failed once, together
    (trained,) = [r for r in _runs_of(client, dag_run) if "train.identity" in r.data.tags]
    assert trained.info.status == "FINISHED" and trained.data.tags["train.processes"] == "2"
    resumed_from = int(trained.data.tags["train.resumed_from_epoch"])
    assert resumed_from >= 1
    steps = sorted(m.step for m in client.get_metric_history(trained.info.run_id, "train_loss"))
    assert steps == list(range(1, epochs + 1))  # in step: no epoch lost or logged twice
    history = client.get_metric_history(trained.info.run_id, "system/epoch_seconds")
    first_resumed = min(m.timestamp for m in history if m.step == resumed_from + 1) / 1000
    print(
        f"2 machines: {peer['hostname']}'s ranks killed after epoch {done_before}; both tasks "
        f"retried and resumed after epoch {resumed_from} (redone: {done_before - resumed_from}); "
        f"the first resumed epoch was logged {first_resumed - killed_at:.0f} s after the kill"
    )
    running = client.search_runs([trained.info.experiment_id], "attributes.status = 'RUNNING'")
    assert running == []
