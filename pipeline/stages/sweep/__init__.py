"""Hyper-parameter sweep: one MLflow parent run, one child run per trial, the best reported.

`sweep.strategy` picks the strategy from `choices.SWEEP_STRATEGIES` (`grid`: every optimizer x
schedule x lr; `optuna`: a pruned TPE search, see `search`). Each strategy module has
`start(cfg, settings, ctx, new) -> {"parent", "items"}` (the parent run, and the items the sweep
DAG maps `trial_stage` over), `trial(cfg, settings, validation, parent, item, ctx) -> dict` and
`finish(cfg, settings, parent, results) -> dict`. Both rank trials on the validation split
(`common.rank`), never on test. In the MLflow UI the children sit under the parent and compare
side by side; the parent holds the results table, plots and the best trial.
"""

from __future__ import annotations

from pipeline import choices
from pipeline.config import Config
from pipeline.context import RunContext
from pipeline.settings import Settings
from pipeline.stages.sweep.common import check


def _strategy(cfg: Config):
    return choices.load(choices.SWEEP_STRATEGIES, cfg.sweep.strategy)


def start(cfg: Config, settings: Settings, ctx: RunContext | None = None, new: bool = False):
    """Check the sweep can rank its trials, open its parent run (RUNNING until `finish`) and
    return {"parent": run id, "items": [...]}. `new`: an Optuna study of the same name starts
    over instead of resuming. Raises ConfigError when the recipe has no validation split."""
    check(cfg)
    return _strategy(cfg).start(cfg, settings, ctx or RunContext(), new)


def trial_stage(
    cfg: Config,
    settings: Settings,
    validation: dict,
    parent: str,
    item: dict,
    ctx: RunContext | None = None,
) -> dict:
    """One item of `start`: its trial(s) trained and evaluated as child runs of `parent`.

    Interrupted (SIGTERM, SIGINT): the trial's run ends KILLED (train), an Optuna trial FAIL,
    and the parent run KILLED too (a worker still running reopens nothing; `finish` closes it)."""
    try:
        return _strategy(cfg).trial(cfg, settings, validation, parent, item, ctx or RunContext())
    except KeyboardInterrupt:
        from mlflow import MlflowClient

        MlflowClient().set_terminated(parent, "KILLED")
        raise


def finish(cfg: Config, settings: Settings, parent: str, results: list[dict]) -> dict:
    """Rank the trials on validation; log the table, the plots and the best trial on the
    parent run, and close it. Returns {"parent_run_id", "best", "trials", ...}."""
    return _strategy(cfg).finish(cfg, settings, parent, results)
