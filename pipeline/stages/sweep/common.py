"""What the sweep strategies share: the trial's config, the check that trials can be ranked, the
parent run, the child-run tags and the ranking on the validation split."""

from __future__ import annotations

from pipeline.config import Config, ConfigError, config_from_dict
from pipeline.context import RunContext
from pipeline.settings import Settings

SWEEP_TAG = "sweep.parent"


def trial_config(cfg: Config, overrides: dict) -> Config:
    """The base config with one trial's dotted overrides applied (validated like any override)."""
    resolved = cfg.to_dict()  # already layered: its preset must not apply a second time
    return config_from_dict({**resolved, "base": {**resolved["base"], "preset": None}}, overrides)


def check(cfg: Config) -> None:
    """Trials are ranked on the validation split (choosing on test would overfit the test
    split): a recipe without one is refused, with the fix."""
    if cfg.train.val_fraction == 0:
        preset = cfg.base.preset
        fix = (
            f"preset {preset} sets it to 0: set train.val_fraction: 0.1 under presets.{preset} "
            "in params.yaml, or sweep another preset"
            if preset
            else "set train.val_fraction: 0.1 in params.yaml"
        )
        raise ConfigError(
            f"a sweep ranks its trials on the validation split, and train.val_fraction is 0; {fix}"
        )


def parent_run(cfg: Config, settings: Settings, ctx: RunContext, name: str, tags: dict) -> str:
    """The sweep's parent run, RUNNING until the strategy's `finish` closes it."""
    from pipeline.tracking import store

    return store.new_run(settings, cfg.tracking.experiment, ctx, name, tags)


def child(ctx: RunContext, parent: str, scope: str = "", **tags: str) -> RunContext:
    """The context a trial trains in: a child run of `parent` that resumes its own checkpoint."""
    return ctx.with_(
        resume=True, scope=scope, tags={"mlflow.parentRunId": parent, SWEEP_TAG: parent, **tags}
    )


def validation_scores(run_id: str) -> dict:
    """The last epoch's val_loss and val_accuracy the run logged (None when it logged none)."""
    from mlflow import MlflowClient

    metrics = MlflowClient().get_run(run_id).data.metrics
    return {"val_loss": metrics.get("val_loss"), "val_accuracy": metrics.get("val_accuracy")}


def rank(rows: list[dict]) -> list[dict]:
    """Trials best first: lowest last-epoch val_loss, higher val_accuracy breaking ties."""
    return sorted(rows, key=lambda r: (r["val_loss"], -(r.get("val_accuracy") or 0.0)))


def plot_dir(settings: Settings):
    folder = settings.outputs / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
