"""Score a folder of images (or an .npy file) with a registered model, pinned at the start.

The form's `input` and `output` must lie under PIPELINE_PREDICT_ROOTS (folders separated by ':',
default the project's inbox/ and outputs/predictions/): whoever can trigger a run reads and writes
only there, never the pipeline's own records.
resolve_model turns the reference (default: the champion) into one exact version before any
scoring, so a promotion during the run cannot mix two models into one output; the version is
written into the output. Wiring only: pipeline/* is imported inside the task bodies.
"""

from __future__ import annotations

from datetime import timedelta

import dag_support as ds
import pendulum
from airflow.sdk import Param, dag, get_current_context, task


@dag(
    dag_id="batch_predict",
    description="Score a folder of images with the champion (or a chosen version)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["ml", "prediction", "mlflow"],
    default_args=ds.default_args(execution_timeout=timedelta(hours=2)),
    doc_md=__doc__,
    params={
        "model": Param(
            "image-classifier@champion",
            type="string",
            description="NAME@ALIAS, NAME/VERSION, or NAME (its champion)",
        ),
        "input": Param(
            str(ds.PROJECT_ROOT / "inbox"),
            type="string",
            description="a folder of images, or an .npy file (N x C x H x W)",
        ),
        "output": Param(
            str(ds.PROJECT_ROOT / "outputs" / "predictions" / "predictions.csv"),
            type="string",
            description="a .csv or .json file; {run_id} is replaced by the DAG run id",
        ),
    },
)
def batch_predict():
    @task
    def resolve_model() -> dict:
        """The exact version to use for the whole run."""
        from pipeline.stages.predict import pin_stage

        with ds.permanent_errors():
            return pin_stage(ds.settings(), ds.run_params()["model"])

    @task
    def score(pinned: dict) -> dict:
        from pipeline.files import confined
        from pipeline.stages.predict import predict_stage

        ctx = get_current_context()
        params = ctx["params"]
        output = params["output"].replace("{run_id}", ctx["run_id"].replace(":", "_"))
        roots = ds.predict_roots()
        here = ds.PROJECT_ROOT  # relative paths are the project's, wherever the worker runs
        with ds.permanent_errors():  # unreadable input will not fix itself
            return predict_stage(
                ds.settings(),
                f"{pinned['name']}/{pinned['version']}",
                confined(here / params["input"], roots, "input", ds.PREDICT_ROOTS),
                confined(here / output, roots, "output", ds.PREDICT_ROOTS),
                ds.config().monitor,  # the prediction log
            )

    score(resolve_model())


batch_predict()
