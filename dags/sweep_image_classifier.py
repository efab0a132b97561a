"""Hyper-parameter sweep: validate -> start_sweep -> sweep_items -> trial (mapped) -> finish_sweep.

`sweep.strategy: grid`: one mapped `trial` per optimizer x schedule x lr in params.yaml `sweep:`.
`optuna`: one mapped `trial` per worker (`sweep.optuna.workers`), each pulling trials from a
shared study until it holds `sweep.optuna.trials`, weak ones pruned by their val_loss; the `gpu`
pool bounds how many train at once, and re-running resumes the study (unless `new_study`). Every
trial is an MLflow child run under one parent run; `finish_sweep` ranks them, logs the table and
plots on the parent, and (with `sweep.register_best`) sends the best trial through the normal
promotion policy. Wiring only: pipeline/* is imported inside the task bodies.
"""

from __future__ import annotations

import dag_support as ds
import pendulum
from airflow.sdk import Param, dag, get_current_context, task


@dag(
    dag_id="sweep_image_classifier",
    description="Grid or Optuna search over optimizers, schedules and learning rates, in MLflow",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "training", "sweep", "mlflow"],
    default_args=ds.default_args(),
    doc_md=__doc__,
    params={
        "new_study": Param(
            False,
            type="boolean",
            description="optuna: start the study over instead of resuming the one of that name",
        )
    },
)
def sweep_image_classifier():
    @task
    def validate() -> dict:
        """Check data/ against data.dvc and run the validation gate once for all trials."""
        from pipeline.stages.validate import validate_stage

        cfg = ds.config()
        with ds.permanent_errors():
            validation = validate_stage(cfg, ds.settings(), ds.airflow_ids())
        return {"config": cfg.to_dict(), "validation": validation}

    @task
    def start_sweep(checked: dict) -> dict:
        from pipeline.stages import sweep

        cfg = ds.config(checked["config"])
        new = bool(get_current_context()["params"].get("new_study"))
        with ds.permanent_errors():
            return sweep.start(cfg, ds.settings(), ds.airflow_ids(), new)

    @task
    def sweep_items(started: dict) -> list[dict]:
        return started["items"]

    @task(**ds.GPU_TASK)
    def trial(item: dict, checked: dict, started: dict) -> dict:
        """A grid point, or an Optuna worker pulling trials: each trial trains + evaluates as a
        child run of the sweep's parent run. A diverged grid point fails at once (no retries);
        a killed one resumes from its checkpoint."""
        from pipeline.stages import sweep

        cfg = ds.config(checked["config"])
        with ds.permanent_errors():
            return sweep.trial_stage(
                cfg,
                ds.settings(),
                checked["validation"],
                started["parent"],
                item,
                ds.airflow_ids(),
            )

    @task(pool=ds.PROMOTION_POOL)
    def finish_sweep(checked: dict, started: dict, results: list[dict]) -> dict:
        """Rank the trials, report on the parent run, optionally register the best."""
        from pipeline.stages import sweep
        from pipeline.stages.register import register_stage

        cfg = ds.config(checked["config"])
        with ds.permanent_errors():
            summary = sweep.finish(cfg, ds.settings(), started["parent"], list(results))
            if cfg.sweep.register_best:
                best = summary["best"]["run_id"]
                summary["registered"] = register_stage(cfg, ds.settings(), best, ds.airflow_ids())
        return summary

    checked = validate()
    started = start_sweep(checked)
    results = trial.partial(checked=checked, started=started).expand(item=sweep_items(started))
    finish_sweep(checked, started, results)


sweep_image_classifier()
