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

# Form field -> params.yaml key. Empty fields keep params.yaml's value (after the preset's), so
# a preset's own val_fraction or dataset stays unless a value is typed in.
PARAM_KEYS = {
    "preset": "base.preset",
    "dataset": "base.dataset",
    "strategy": "sweep.strategy",
    "trials": "sweep.optuna.trials",
    "epochs": "sweep.epochs",
    "val_fraction": "train.val_fraction",
}
PARAMS = ds.params_yaml()


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
        "preset": ds.preset_param(PARAMS, None),
        "dataset": ds.choice(
            "base.dataset", None, description="empty: params.yaml's; must be what data.dvc holds"
        ),
        "strategy": ds.choice(
            "sweep.strategy", None, description=f"empty: {ds.param(PARAMS, 'sweep.strategy')}"
        ),
        "trials": ds.form_param(
            None,
            type="integer",
            minimum=1,
            description=f"optuna: trials; empty: {ds.param(PARAMS, 'sweep.optuna.trials')}",
        ),
        "epochs": ds.form_param(
            None,
            type="integer",
            minimum=1,
            description=f"per trial; empty: {ds.param(PARAMS, 'sweep.epochs')}",
        ),
        "val_fraction": ds.form_param(
            None,
            type="number",
            exclusiveMinimum=0,
            exclusiveMaximum=1,
            description="held out of training to rank the trials; empty: the preset's or "
            f"params.yaml's ({ds.param(PARAMS, 'train.val_fraction')})",
        ),
        "new_study": Param(
            False,
            type="boolean",
            description="optuna: start the study over instead of resuming the one of that name",
        ),
    },
)
def sweep_image_classifier():
    @task(multiple_outputs=True, inlets=[ds.DATA])  # the trials take its "validation" alone
    def validate() -> dict:
        """Apply the form to params.yaml, check data/ holds that dataset as data.dvc records it,
        and run the validation gate once for all trials."""
        from pipeline.stages.validate import check_data_stage, validate_stage

        cfg = ds.form_config(PARAM_KEYS)
        pinned = ds.pinned_data()  # every trial, on any worker, trains on this version
        with ds.permanent_errors():
            check_data_stage(cfg, ds.settings())
            validation = validate_stage(cfg, ds.settings(), ds.context())
        return {"config": cfg.to_dict(), "validation": validation, "pinned": pinned}

    @ds.stage_task()
    def start_sweep(cfg, settings, ctx) -> dict:
        from pipeline.stages import sweep

        return sweep.start(cfg, settings, ctx, bool(get_current_context()["params"]["new_study"]))

    @task
    def sweep_items(started: dict) -> list[dict]:
        return started["items"]

    @ds.stage_task(**ds.GPU_TASK)
    def trial(cfg, settings, ctx, item: dict, started: dict, validation: dict) -> dict:
        """A grid point, or an Optuna worker pulling trials: each trial trains + evaluates as a
        child run of the sweep's parent run. A diverged grid point fails at once (no retries);
        a killed one resumes from its checkpoint."""
        from pipeline.stages import sweep

        return sweep.trial_stage(cfg, settings, validation, started["parent"], item, ctx)

    @ds.stage_task(pool=ds.PROMOTION_POOL)
    def finish_sweep(cfg, settings, ctx, started: dict, results: list[dict]) -> dict:
        """Rank the trials on validation, report on the parent run, optionally register the
        best."""
        from pipeline.stages import sweep
        from pipeline.stages.register import register_stage

        summary = sweep.finish(cfg, settings, started["parent"], list(results))
        if cfg.sweep.register_best:
            best = summary["best"]["run_id"]
            summary["registered"] = register_stage(cfg, settings, best, ctx)
        return summary

    checked = validate()
    started = start_sweep(checked)
    results = trial.partial(
        checked=checked, started=started, validation=checked["validation"]
    ).expand(item=sweep_items(started))
    finish_sweep(checked, started, results)


sweep_image_classifier()
