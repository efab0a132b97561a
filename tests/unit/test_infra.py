"""infra/: the compose file, Dockerfile, Helm values and pod template parse, carry no secrets,
and agree with the code (env var names, DAG folder, pools, connection id, GPU placement)."""

import re

import yaml

from pipeline import alerts
from tests.conftest import REPO

INFRA = REPO / "infra"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yaml").read_text())


def _env_names_read_by_code() -> set[str]:
    pattern = re.compile(r"os\.environ(?:\.get)?\(\s*\"([A-Z_]+)\"|os\.environ\[\"([A-Z_]+)\"\]")
    names = set()
    for path in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "dags").glob("*.py")]:
        for a, b in pattern.findall(path.read_text()):
            names.add(a or b)
    return names


def test_compose_has_the_production_topology():
    services = _compose()["services"]
    assert {
        "postgres",
        "redis",
        "minio",
        "mlflow",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
    } <= set(services)
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    assert "@postgres:5432/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    devices = services["airflow-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    mlflow = " ".join(services["mlflow"]["command"].split())
    assert "--app-name basic-auth" in mlflow and "--artifacts-destination s3://" in mlflow
    assert "--backend-store-uri" not in mlflow and "PASSWORD" not in mlflow  # never in ps
    assert "@postgres:5432/mlflow" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    # every database the services use is one postgres-init.sql creates (or POSTGRES_DB)
    created = set(re.findall(r"CREATE DATABASE (\w+);", (INFRA / "postgres-init.sql").read_text()))
    assert env["PIPELINE_OPTUNA_STORAGE"].endswith("@postgres:5432/optuna")
    assert {"mlflow", "optuna"} <= created


def test_no_credentials_in_the_repository():
    text = (INFRA / "docker-compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)(?::-[^}]*)?\}", text))
    example = dict(
        line.split("=", 1)
        for line in (INFRA / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert used <= set(example), used - set(example)
    for key, value in example.items():
        if any(word in key for word in ("PASSWORD", "SECRET", "KEY")):
            assert value.startswith("change-me"), key
    assert "password:" not in (INFRA / "helm" / "values.yaml").read_text().lower()


def test_the_pipeline_settings_named_in_infra_are_the_ones_the_code_reads():
    read = _env_names_read_by_code()
    env = _compose()["services"]["airflow-worker"]["environment"]
    helm = yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())
    named = {k for k in env if k.startswith("PIPELINE_")}
    named |= {e["name"] for e in helm["env"] if e["name"].startswith("PIPELINE_")}
    assert named and named <= read, named - read
    for settings in ("MLFLOW_TRACKING_URI", "MLFLOW_ARTIFACT_ROOT", "PIPELINE_ROOT"):
        assert settings in read and settings in env
    readme = (INFRA / "README.md").read_text()
    for name in named | {"MLFLOW_TRACKING_URI", "MLFLOW_ARTIFACT_ROOT"}:
        assert f"`{name}`" in readme, name
    assert f"`{alerts.CONNECTION_ID}`" in readme


def test_image_dag_folder_and_pools_agree_with_the_dags():
    dockerfile = (INFRA / "Dockerfile").read_text()
    env = _compose()["services"]["airflow-scheduler"]["environment"]
    helm = yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())
    folder = env["AIRFLOW__CORE__DAGS_FOLDER"]
    assert f"AIRFLOW__CORE__DAGS_FOLDER={folder}" in dockerfile and "COPY dags ./dags" in dockerfile
    assert helm["config"]["core"]["dags_folder"] == folder
    assert env["PIPELINE_ROOT"] == folder.removesuffix("/dags")
    wiring = (REPO / "dags" / "dag_support.py").read_text()
    pools = set(re.findall(r'^(?:PROMOTION|GPU)_POOL = "(\w+)"', wiring, re.M))
    assert _compose()["services"]["airflow-init"]["command"] == "scripts/airflow-init.sh"
    assert "COPY scripts/airflow-init.sh ./scripts/" in dockerfile
    init = (REPO / "scripts" / "airflow-init.sh").read_text()
    assert pools == {"promotion", "gpu"}
    assert all(f"airflow pools set {p} " in init for p in pools)


def test_a_worker_serves_the_queue_the_training_tasks_go_to():
    """A run on several machines puts train and train_peer on PIPELINE_TRAIN_QUEUE: with no
    worker on it they would wait until the join timeout."""
    services = _compose()["services"]
    queue = services["airflow-scheduler"]["environment"]["PIPELINE_TRAIN_QUEUE"]
    worker = services["airflow-worker"]
    assert worker["environment"]["PIPELINE_TRAIN_QUEUE"] == queue
    served = worker["command"].split("--queues", 1)[1].split()[0].split(",")
    assert queue in served and "default" in served  # and every other task's


def test_kubernetes_runs_the_train_task_on_a_gpu_node():
    helm = yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())
    assert helm["executor"] == "KubernetesExecutor"
    pod = yaml.safe_load((INFRA / "helm" / "gpu-pod-template.yaml").read_text())
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "base"  # the KubernetesExecutor fills in the container called base
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["spec"]["nodeSelector"]
    wiring = (REPO / "dags" / "dag_support.py").read_text()  # GPU_TASK: train and sweep trials
    assert "infra/helm/gpu-pod-template.yaml" in wiring
    # a training on several machines meets at the first pod's IP: pods resolve no host names
    (address,) = [e for e in container["env"] if e["name"] == "PIPELINE_NODE_ADDRESS"]
    assert address["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert "COPY infra/helm ./infra/helm" in (INFRA / "Dockerfile").read_text()  # in the image


def _helm() -> dict:
    return yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())


def test_the_image_meets_other_hosts_at_an_s3_dvc_remote_not_a_local_path():
    from configobj import ConfigObj  # what DVC reads its config with

    assert "COPY infra/dvc-config .dvc/config" in (INFRA / "Dockerfile").read_text()
    config = ConfigObj(str(INFRA / "dvc-config"))
    default = config["core"]["remote"]
    assert config[f'remote "{default}"']["url"].startswith("s3://")
    assert config["core"]["no_scm"] == "true"  # the image holds no .git
    # the bucket is one compose creates, the endpoint comes from the environment
    bucket = config[f'remote "{default}"']["url"].removeprefix("s3://").split("/")[0]
    services = _compose()["services"]
    assert f"s3/{bucket}" in services["minio-buckets"]["entrypoint"]
    assert services["airflow-worker"]["environment"]["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"


def test_the_mlflow_server_answers_the_host_name_the_workers_use():
    from urllib.parse import urlsplit

    from mlflow.server.security_utils import is_allowed_host_header

    services = _compose()["services"]
    worker_uri = services["airflow-worker"]["environment"]["MLFLOW_TRACKING_URI"]
    host = urlsplit(worker_uri).netloc  # what requests sends as the Host header
    given = services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"]
    default = re.fullmatch(r"\$\{MLFLOW_ALLOWED_HOSTS:-(.+)\}", given).group(1)
    example = dict(
        line.split("=", 1)
        for line in (INFRA / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for allowed in (default, example["MLFLOW_ALLOWED_HOSTS"]):
        hosts = [h.strip() for h in allowed.split(",")]
        assert is_allowed_host_header(hosts, host), (host, allowed)
        assert is_allowed_host_header(hosts, "localhost:5000")  # the published port
    helm = _helm()
    helm_uri = next(e["value"] for e in helm["env"] if e["name"] == "MLFLOW_TRACKING_URI")
    text = (INFRA / "helm" / "values.yaml").read_text()
    assert f"naming {urlsplit(helm_uri).netloc}" in text  # the external server's instruction


def test_every_host_signs_alike_and_task_logs_outlive_their_worker():
    env = _compose()["services"]["airflow-worker"]["environment"]
    assert env["AIRFLOW__API__SECRET_KEY"] == "${AIRFLOW_API_SECRET_KEY}"
    assert env["AIRFLOW__LOGGING__REMOTE_LOGGING"] == "True"
    bucket = env["AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER"].removeprefix("s3://").split("/")[0]
    assert f"s3/{bucket}" in _compose()["services"]["minio-buckets"]["entrypoint"]
    conn = env["AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID"]
    assert f"AIRFLOW_CONN_{conn.upper()}" in env
    helm = _helm()
    assert helm["config"]["logging"]["remote_logging"] == "True"
    assert helm["config"]["logging"]["remote_log_conn_id"] == conn
    assert f"AIRFLOW_CONN_{conn.upper()}" in {e["name"] for e in helm["env"]}
    assert "AIRFLOW__API__SECRET_KEY" in {s["envName"] for s in helm["secret"]}
    # the handler's provider is in the image's extra
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"apache-airflow-providers-amazon' in pyproject.split("deploy = [")[1].split("]")[0]


def test_alias_moves_from_every_host_lock_in_the_registrys_database():
    services = _compose()["services"]
    lock = services["airflow-worker"]["environment"]["PIPELINE_REGISTRY_LOCK_URI"]
    backend = services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert lock.startswith("postgresql://") and lock.rsplit("@", 1)[1] == backend.rsplit("@", 1)[1]
    assert "PIPELINE_REGISTRY_LOCK_URI" in {s["envName"] for s in _helm()["secret"]}


def test_no_service_shares_a_disk_with_another():
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            # a service's own named volume is its disk; one named by two services is shared
            users = [
                other
                for other, s in _compose()["services"].items()
                if any(v.split(":")[0] == volume.split(":")[0] for v in s.get("volumes", []))
            ]
            assert users == [name], (volume, users)
    helm = _helm()
    assert "extraVolumes" not in helm["workers"]
    pod = yaml.safe_load((INFRA / "helm" / "gpu-pod-template.yaml").read_text())
    assert "volumes" not in pod["spec"]
