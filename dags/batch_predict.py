"""Score a folder of images (or an .npy file) with a registered model, pinned at the start.

resolve_model turns the reference (default: the champion) into one exact version before any
scoring, so a promotion during the run cannot mix two models into one output; the version is
written into the output. Wiring only: pipeline/* is imported inside the task bodies.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

PROJECT_ROOT = Path(os.environ.get("PIPELINE_ROOT") or Path(__file__).resolve().parents[1])


def _alert(context) -> None:
    """on_failure_callback: the ALERT log line and webhook of pipeline/alerts.py, imported late."""
    from pipeline.alerts import on_failure

    on_failure(context)


def _client():
    import mlflow
    from mlflow import MlflowClient

    from pipeline.settings import Settings

    mlflow.set_tracking_uri(Settings.from_env(PROJECT_ROOT).tracking_uri)
    return MlflowClient()


@dag(
    dag_id="batch_predict",
    description="Score a folder of images with the champion (or a chosen version)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["ml", "prediction", "mlflow"],
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,
        "execution_timeout": timedelta(hours=2),
        "on_failure_callback": _alert,
    },
    doc_md=__doc__,
    params={
        "model": Param(
            "image-classifier@champion",
            type="string",
            description="NAME@ALIAS, NAME/VERSION, or NAME (its champion)",
        ),
        "input": Param(
            str(PROJECT_ROOT / "inbox"),
            type="string",
            description="a folder of images, or an .npy file (N x C x H x W)",
        ),
        "output": Param(
            str(PROJECT_ROOT / "outputs" / "predictions" / "predictions.csv"),
            type="string",
            description="a .csv or .json file; {run_id} is replaced by the DAG run id",
        ),
    },
)
def batch_predict():
    @task
    def resolve_model() -> dict:
        """The exact version to use for the whole run."""
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline import registry

        try:
            version = registry.resolve(_client(), get_current_context()["params"]["model"])
        except LookupError as exc:
            raise AirflowFailException(str(exc)) from exc
        return {"name": version.name, "version": int(version.version), "run_id": version.run_id}

    @task
    def score(pinned: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline.data import DataError
        from pipeline.predict import predict_stage

        ctx = get_current_context()
        params = ctx["params"]
        output = Path(params["output"].replace("{run_id}", ctx["run_id"].replace(":", "_")))
        try:
            return predict_stage(
                _client(), f"{pinned['name']}/{pinned['version']}", Path(params["input"]), output
            )
        except DataError as exc:  # unreadable input will not fix itself
            raise AirflowFailException(str(exc)) from exc

    score(resolve_model())


batch_predict()
