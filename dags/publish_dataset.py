"""Publish a dataset version: write data/ from its source, `dvc add` + `dvc push`, and update the
`pipeline-data` Asset, which starts the training DAG (data-aware scheduling).

Nothing changed (same bytes, same md5): the task is skipped and no Asset event is sent. The new
data.dvc is left in the checkout for you to commit: the DAG records versions, git keeps history.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pendulum
import yaml
from airflow.sdk import Asset, Param, dag, get_current_context, task

PROJECT_ROOT = Path(os.environ.get("PIPELINE_ROOT") or Path(__file__).resolve().parents[1])


def _alert(context) -> None:
    """on_failure_callback: the ALERT log line and webhook of pipeline/alerts.py, imported late."""
    from pipeline.alerts import on_failure

    on_failure(context)


DATA = Asset(name="pipeline-data", uri=(PROJECT_ROOT / "data.dvc").as_uri())


def _data_defaults() -> dict:
    try:
        params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        params = {}
    return {
        "dataset": params.get("base", {}).get("dataset", "digits"),
        "test_fraction": params.get("data", {}).get("test_fraction", 0.2),
    }


DEFAULTS = _data_defaults()


@dag(
    dag_id="publish_dataset",
    description="Write a dataset version with DVC and update the pipeline-data Asset",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["data", "dvc"],
    default_args={
        "retries": 1,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,
        "execution_timeout": timedelta(hours=2),
        "on_failure_callback": _alert,
    },
    doc_md=__doc__,
    params={
        "dataset": Param(
            DEFAULTS["dataset"], enum=["digits", "mnist", "fashion_mnist", "cifar10", "imagefolder"]
        ),
        "source_dir": Param(None, type=["null", "string"], description="raw files / class folders"),
        "test_fraction": Param(DEFAULTS["test_fraction"], type="number", exclusiveMinimum=0),
    },
)
def publish_dataset():
    @task(outlets=[DATA])
    def publish() -> dict:
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from pipeline.config import ConfigError, load_config
        from pipeline.data import DataError, materialize
        from pipeline.data.versioning import POINTER, recorded_md5
        from pipeline.settings import Settings

        ctx = get_current_context()
        params, settings = ctx["params"], Settings.from_env(PROJECT_ROOT)
        before = recorded_md5(settings.root) if (settings.root / POINTER).exists() else None
        try:
            cfg = load_config(
                settings.params,
                {"base.dataset": params["dataset"], "data.test_fraction": params["test_fraction"]},
            )
            md5 = materialize(
                cfg.base.dataset,
                settings.root,
                settings.data_dir,
                Path(params["source_dir"]) if params["source_dir"] else None,
                cfg.data.download,
                cfg.data.test_fraction,
                cfg.data.image_size,
                rewrite=True,
            )
        except (ConfigError, DataError) as exc:
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
        if md5 == before:
            raise AirflowSkipException(f"data unchanged ({md5}): no new version, no Asset event")
        ctx["outlet_events"][DATA].extra = {"data_md5": md5, "dataset": cfg.base.dataset}
        return {"data_md5": md5, "previous": before, "dataset": cfg.base.dataset}

    publish()


publish_dataset()
