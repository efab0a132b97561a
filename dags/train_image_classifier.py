"""Train an image classifier: check_data -> validate -> skip_if_unchanged -> train -> evaluate
-> register.

Wiring only: the stage functions live in `pipeline.stages` and are imported inside the task bodies,
so parsing this file never imports torch, MLflow or Great Expectations. Tasks hand each other
small JSON (resolved config, data md5, MLflow run id), so each may run on a different worker.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pendulum
import yaml
from airflow.sdk import (
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.exceptions import AirflowFailException

PROJECT_ROOT = Path(os.environ.get("PIPELINE_ROOT") or Path(__file__).resolve().parents[1])
SCHEDULE = os.environ.get("PIPELINE_SCHEDULE", "@weekly")  # "none": new data and triggers only
# Updated by the publish_dataset DAG when it records a new data version: runs on it, or on time.
DATA = Asset(name="pipeline-data", uri=(PROJECT_ROOT / "data.dvc").as_uri())
PROMOTION_POOL = "promotion"  # one slot: `airflow pools set promotion 1 ...` (make run does it)
GPU_POOL = "gpu"  # slots = GPUs on the worker (1 on CPU): one training per device
GPU_POD_TEMPLATE = PROJECT_ROOT / "infra/helm/gpu-pod-template.yaml"


def _alert(context) -> None:
    """on_failure_callback: the ALERT log line and webhook of pipeline/alerts.py, imported late."""
    from pipeline.alerts import on_failure

    on_failure(context)


def _defaults() -> dict:
    """The trigger form starts from params.yaml, so an unchanged form reproduces a scheduled run."""
    try:
        params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        params = {}  # the first task reports the broken file with a proper message
    base, train = params.get("base", {}), params.get("train", {})
    return {
        "preset": base.get("preset"),
        "presets": sorted(params.get("presets") or {}),
        "dataset": base.get("dataset", "digits"),
        "model": train.get("model", {}).get("name", "cnn"),
        "optimizer": train.get("optimizer", {}).get("name", "adamw"),
        "lr": train.get("optimizer", {}).get("lr", 0.003),
        "schedule": train.get("schedule", {}).get("name", "cosine"),
        "epochs": train.get("epochs", 12),
        "batch_size": train.get("batch_size", 64),
    }


# Form field -> params.yaml key; run params override params.yaml through these.
PARAM_KEYS = {
    "preset": "base.preset",
    "dataset": "base.dataset",
    "model": "train.model.name",
    "optimizer": "train.optimizer.name",
    "lr": "train.optimizer.lr",
    "schedule": "train.schedule.name",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
}
DEFAULTS = _defaults()


@contextmanager
def _stage_errors():
    """Bad config, bad or untracked data and divergence will not fix themselves: fail, no retry."""
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError
    from pipeline.data import DataError
    from pipeline.train import TrainingDiverged
    from pipeline.validate import ValidationFailed

    try:
        yield
    except (ConfigError, DataError, ValidationFailed, TrainingDiverged, CheckpointError) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def _airflow_ids() -> dict:
    """Where a run came from, for lineage: which DAG, which run, which try."""
    ctx = get_current_context()
    return {
        "dag_id": ctx["dag"].dag_id,
        "run_id": ctx["run_id"],
        "try_number": ctx["ti"].try_number,
    }


def _settings():
    from pipeline.settings import Settings

    return Settings.from_env(PROJECT_ROOT)


def _config(config: dict):
    from pipeline.config import resolved_config

    return resolved_config(config)


@dag(
    dag_id="train_image_classifier",
    description="DVC data -> GX validation -> PyTorch training -> evaluation -> MLflow registry",
    schedule=[DATA]
    if SCHEDULE.lower() == "none"
    else AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(SCHEDULE, timezone="UTC"), assets=[DATA]
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "training", "mlflow"],
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,  # 30 s, then 60 s: a flaky store gets time to recover
        "max_retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(minutes=30),
        "on_failure_callback": _alert,  # log + optional webhook (pipeline/alerts.py)
    },
    doc_md=__doc__,
    params={
        "preset": Param(
            DEFAULTS["preset"],
            type=["null", "string"],
            enum=[None, *DEFAULTS["presets"]],
            description="a recipe from params.yaml `presets:`; fields you change below win",
        ),
        "dataset": Param(
            DEFAULTS["dataset"],
            enum=["digits", "mnist", "fashion_mnist", "cifar10", "imagefolder"],
            description="must match the data version in data.dvc",
        ),
        "model": Param(DEFAULTS["model"], enum=["mlp", "cnn", "resnet18"]),
        "optimizer": Param(DEFAULTS["optimizer"], enum=["sgd", "adam", "adamw", "rmsprop"]),
        "lr": Param(DEFAULTS["lr"], type="number", exclusiveMinimum=0),
        "schedule": Param(
            DEFAULTS["schedule"],
            enum=["constant", "exponential", "step", "multistep", "cosine", "onecycle"],
        ),
        "epochs": Param(DEFAULTS["epochs"], type="integer", minimum=1),
        "batch_size": Param(DEFAULTS["batch_size"], type="integer", minimum=1),
        "force_retrain": Param(
            False,
            type="boolean",
            description="retrain even when data, params and code equal the champion's",
        ),
    },
)
def train_image_classifier():
    @task
    def check_data() -> dict:
        """Resolve params.yaml + run params; check data/ is present and matches data.dvc."""
        from pipeline.config import load_config
        from pipeline.stages import check_data_stage

        settings = _settings()
        run_params = get_current_context()["params"]
        # Only fields changed from the form's defaults override, so a chosen preset is not
        # undone by the untouched fields (which show params.yaml's values).
        overrides = {
            key: run_params[name]
            for name, key in PARAM_KEYS.items()
            if name in run_params and run_params[name] != DEFAULTS[name]
        }
        with _stage_errors():
            cfg = load_config(settings.params, overrides)
            data = check_data_stage(cfg, settings)
        return {"config": cfg.to_dict(), **data}

    @task
    def validate(checked: dict) -> dict:
        """Great Expectations suite per split; a failure stops the run before training."""
        from pipeline.stages import validate_stage

        with _stage_errors():
            return validate_stage(_config(checked["config"]), _settings(), _airflow_ids())

    @task
    def skip_if_unchanged(checked: dict, validation: dict) -> dict:
        """Same data, params and code as the champion: record a skipped run, train nothing."""
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline.stages import record_skip, unchanged_stage

        cfg, settings = _config(checked["config"]), _settings()
        with _stage_errors():
            decision = unchanged_stage(cfg, settings, validation["data_md5"])
        if decision["unchanged"] and not get_current_context()["params"].get("force_retrain"):
            record_skip(cfg, settings, decision, _airflow_ids())
            raise AirflowSkipException(
                f"skipped: {decision['reason']}; trigger with force_retrain=true to retrain"
            )
        return decision

    @task(
        pool=GPU_POOL,
        execution_timeout=timedelta(hours=6),
        # KubernetesExecutor only (others ignore it): this task's pod gets a GPU node.
        executor_config={"pod_template_file": str(GPU_POD_TEMPLATE)},
    )
    def train(checked: dict, validation: dict, _decision: dict) -> dict:
        """Train on the validated data version, logging to MLflow with lineage tags.

        A retry resumes from this DAG run's last epoch checkpoint, into the same MLflow run."""
        from pipeline.stages import train_stage

        with _stage_errors():
            return train_stage(
                _config(checked["config"]), _settings(), validation, _airflow_ids(), resume=True
            )

    @task
    def evaluate(checked: dict, trained: dict) -> dict:
        """Test-split metrics, confusion matrix and learning curves into the same MLflow run."""
        from pipeline.stages import evaluate_stage

        with _stage_errors():
            return evaluate_stage(_config(checked["config"]), _settings(), trained["run_id"])

    @task(pool=PROMOTION_POOL)
    def register(checked: dict, evaluated: dict) -> dict:
        """Register a version (idempotent), alias challenger, let the policy decide on champion.

        The one-slot pool serializes promotions across DAG runs and workers; MLflow being
        unreachable is retried (it fails the task only after the retries)."""
        from pipeline.stages import register_stage

        with _stage_errors():
            return register_stage(
                _config(checked["config"]), _settings(), evaluated["run_id"], _airflow_ids()
            )

    checked = check_data()
    validation = validate(checked)
    trained = train(checked, validation, skip_if_unchanged(checked, validation))
    register(checked, evaluate(checked, trained))


train_image_classifier()
