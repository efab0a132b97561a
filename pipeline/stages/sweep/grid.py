"""sweep.strategy: grid: one trial per optimizer x schedule x lr of params.yaml `sweep:`, ranked
by the last epoch's val_loss; the learning curves overlaid on the parent run."""

from __future__ import annotations

import itertools
import json

from pipeline.config import Config
from pipeline.context import RunContext
from pipeline.settings import Settings
from pipeline.stages.sweep.common import (
    child,
    parent_run,
    plot_dir,
    rank,
    trial_config,
    validation_scores,
)


def grid(cfg: Config) -> list[dict]:
    """Every optimizer x schedule x lr combination as dotted overrides of the base config."""
    s = cfg.sweep
    return [
        {
            "train.optimizer.name": optimizer,
            "train.schedule.name": schedule,
            "train.optimizer.lr": lr,
            "train.epochs": s.epochs,
        }
        for optimizer, schedule, lr in itertools.product(s.optimizers, s.schedules, s.lrs)
    ]


def start(cfg: Config, settings: Settings, ctx: RunContext, new: bool = False) -> dict:
    """The parent run and the grid's points (`new` does not apply: a grid keeps no state)."""
    points = grid(cfg)
    tags = {"sweep.strategy": "grid", "sweep.grid": json.dumps(cfg.sweep.model_dump())}
    name = f"sweep-{cfg.base.dataset}-{len(points)}-trials"
    return {"parent": parent_run(cfg, settings, ctx, name, tags), "items": points}


def trial(
    cfg: Config, settings: Settings, validation: dict, parent: str, item: dict, ctx: RunContext
) -> dict:
    """One grid point trained and evaluated as a child run of `parent`: {"run_id",
    "overrides", "val_loss", "val_accuracy", test scores...}."""
    from pipeline.stages.evaluate import evaluate_stage
    from pipeline.stages.train import train_stage

    config = trial_config(cfg, item)
    trained = train_stage(config, settings, validation, child(ctx, parent))
    scores = evaluate_stage(config, settings, trained["run_id"])
    return {**scores, "overrides": item, **validation_scores(trained["run_id"])}


def finish(cfg: Config, settings: Settings, parent: str, results: list[dict]) -> dict:
    """Rank by val_loss; the table, the overlaid learning curves and the best trial on the
    parent run (its test metric is reported, not chosen on)."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking import store
    from pipeline.training import plots

    store.configure(settings, cfg.tracking.experiment)
    client = MlflowClient()
    metric = cfg.register_.metric
    ranked = rank(results)
    best = ranked[0]
    histories = {
        _label(r["overrides"]): mlflow.artifacts.load_dict(f"runs:/{r['run_id']}/history.json")[
            "history"
        ]
        for r in ranked
    }
    plot = plots.plot_sweep(histories, plot_dir(settings) / "sweep_curves.png")
    client.log_artifact(parent, str(plot), "plots")
    summary = {"objective": "val_loss", "metric": metric, "trials": ranked}
    client.log_dict(parent, summary, "sweep_results.json")
    client.log_text(parent, _table(ranked, metric), "sweep_results.md")
    client.log_metric(parent, "best_val_loss", best["val_loss"])
    client.log_metric(parent, f"best_{metric}", best[metric])
    client.set_tag(parent, "sweep.best_run_id", best["run_id"])
    client.set_tag(parent, "sweep.best", _label(best["overrides"]))
    client.set_terminated(parent)
    return {"parent_run_id": parent, "best": best, "trials": len(ranked)}


def _label(overrides: dict) -> str:
    return (
        f"{overrides['train.optimizer.name']} {overrides['train.schedule.name']} "
        f"lr {overrides['train.optimizer.lr']:g}"
    )


def _table(ranked: list[dict], metric: str) -> str:
    lines = [f"| rank | trial | val_loss | val_accuracy | {metric} | run |", "|" + "---|" * 6]
    lines += [
        f"| {i} | {_label(r['overrides'])} | {r['val_loss']:.4f} | {r['val_accuracy']:.4f} | "
        f"{r[metric]:.4f} | {r['run_id']} |"
        for i, r in enumerate(ranked, start=1)
    ]
    return "\n".join(lines) + "\n"
