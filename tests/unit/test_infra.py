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
    assert "COPY infra/helm ./infra/helm" in (INFRA / "Dockerfile").read_text()  # in the image
