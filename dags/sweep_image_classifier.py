"""Hyper-parameter sweep: validate -> start_sweep -> grid_points -> trial (mapped) -> finish_sweep.

One mapped `trial` per optimizer x schedule x lr in params.yaml `sweep:`, each an MLflow child run
under one parent run; `finish_sweep` ranks them by the promotion metric, logs the table and an
overlay plot on the parent, and (with `sweep.register_best`) sends the best trial through the
normal promotion policy. Wiring only: pipeline/* is imported inside the task bodies.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

PROJECT_ROOT = Path(os.environ.get("PIPELINE_ROOT") or Path(__file__).resolve().parents[1])


def _alert(context) -> None:
    """on_failure_callback: the ALERT log line and webhook of pipeline/alerts.py, imported late."""
    from pipeline.alerts import on_failure

    on_failure(context)


def _settings():
    from pipeline.settings import Settings

    return Settings.from_env(PROJECT_ROOT)


def _config(resolved: dict | None = None):
    from pipeline.config import ConfigError, load_config, resolved_config

    try:
        return resolved_config(resolved) if resolved else load_config(_settings().params)
    except ConfigError as exc:
        raise AirflowFailException(f"ConfigError: {exc}") from exc


def _airflow_ids() -> dict:
    ctx = get_current_context()
    return {
        "dag_id": ctx["dag"].dag_id,
        "run_id": ctx["run_id"],
        "try_number": ctx["ti"].try_number,
    }


@dag(
    dag_id="sweep_image_classifier",
    description="Grid sweep over optimizers x schedules x learning rates, compared in MLflow",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "training", "sweep", "mlflow"],
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(minutes=30),
        "on_failure_callback": _alert,
    },
    doc_md=__doc__,
)
def sweep_image_classifier():
    @task
    def validate() -> dict:
        """Check data/ against data.dvc and run the validation gate once for all trials."""
        from pipeline.data import DataError
        from pipeline.stages import validate_stage
        from pipeline.validate import ValidationFailed

        cfg = _config()
        try:
            validation = validate_stage(cfg, _settings(), _airflow_ids())
        except (DataError, ValidationFailed) as exc:
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
        return {"config": cfg.to_dict(), "validation": validation}

    @task
    def start_sweep(checked: dict) -> dict:
        from pipeline import sweep

        cfg = _config(checked["config"])
        return {"parent": sweep.start(cfg, _settings(), _airflow_ids()), "grid": sweep.grid(cfg)}

    @task
    def grid_points(started: dict) -> list[dict]:
        return started["grid"]

    @task(pool="gpu", execution_timeout=timedelta(hours=6))
    def trial(overrides: dict, checked: dict, started: dict) -> dict:
        """One grid point: train + evaluate as a child run of the sweep's parent run."""
        from pipeline import sweep

        cfg = _config(checked["config"])
        return sweep.trial_stage(
            cfg, _settings(), checked["validation"], started["parent"], overrides, _airflow_ids()
        )

    @task(pool="promotion")
    def finish_sweep(checked: dict, started: dict, results: list[dict]) -> dict:
        """Rank the trials, report on the parent run, optionally register the best."""
        from pipeline import sweep
        from pipeline.stages import register_stage

        cfg = _config(checked["config"])
        summary = sweep.finish(cfg, _settings(), started["parent"], list(results))
        if cfg.sweep.register_best:
            best = summary["best"]["run_id"]
            summary["registered"] = register_stage(cfg, _settings(), best, _airflow_ids())
        return summary

    checked = validate()
    started = start_sweep(checked)
    results = trial.partial(checked=checked, started=started).expand(overrides=grid_points(started))
    finish_sweep(checked, started, results)


sweep_image_classifier()
