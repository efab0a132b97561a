"""Hyper-parameter sweep: validate -> start_sweep -> grid_points -> trial (mapped) -> finish_sweep.

One mapped `trial` per optimizer x schedule x lr in params.yaml `sweep:`, each an MLflow child run
under one parent run; `finish_sweep` ranks them by the promotion metric, logs the table and an
overlay plot on the parent, and (with `sweep.register_best`) sends the best trial through the
normal promotion policy. Wiring only: pipeline/* is imported inside the task bodies.
"""

from __future__ import annotations

import dag_support as ds
import pendulum
from airflow.sdk import dag, task


@dag(
    dag_id="sweep_image_classifier",
    description="Grid sweep over optimizers x schedules x learning rates, compared in MLflow",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "training", "sweep", "mlflow"],
    default_args=ds.default_args(),
    doc_md=__doc__,
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
        return {
            "parent": sweep.start(cfg, ds.settings(), ds.airflow_ids()),
            "grid": sweep.grid(cfg),
        }

    @task
    def grid_points(started: dict) -> list[dict]:
        return started["grid"]

    @task(**ds.GPU_TASK)
    def trial(overrides: dict, checked: dict, started: dict) -> dict:
        """One grid point: train + evaluate as a child run of the sweep's parent run. A diverged
        trial fails at once (no retries); a killed one resumes from its checkpoint."""
        from pipeline.stages import sweep

        cfg = ds.config(checked["config"])
        with ds.permanent_errors():
            return sweep.trial_stage(
                cfg,
                ds.settings(),
                checked["validation"],
                started["parent"],
                overrides,
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
    results = trial.partial(checked=checked, started=started).expand(overrides=grid_points(started))
    finish_sweep(checked, started, results)


sweep_image_classifier()
