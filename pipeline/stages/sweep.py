"""Hyper-parameter sweep: one MLflow parent run, one child run per trial, the best reported.

`start` opens the parent and returns the items the sweep DAG maps `trial_stage` over: the grid's
points (`sweep.strategy: grid`), or one item per Optuna worker (`optuna`, see `search`). In the
MLflow UI the children sit under the parent and compare side by side (params as columns), and
the parent holds the results table, plots and the best trial.
"""

from __future__ import annotations

import itertools
import json

from pipeline.config import Config, config_from_dict
from pipeline.settings import Settings

SWEEP_TAG = "sweep.parent"


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


def trial_config(cfg: Config, overrides: dict) -> Config:
    """The base config with one grid point applied (validated like any override)."""
    resolved = cfg.to_dict()  # already layered: its preset must not apply a second time
    return config_from_dict({**resolved, "base": {**resolved["base"], "preset": None}}, overrides)


def start(cfg: Config, settings: Settings, airflow: dict | None = None, new: bool = False):
    """The parent run (RUNNING until `finish`) and the items to map `trial_stage` over. `new`:
    an Optuna study of the same name starts over instead of resuming."""
    if cfg.sweep.strategy == "optuna":
        from pipeline.stages import search

        parent = search.start(cfg, settings, airflow, new)
        return {"parent": parent, "items": [{"worker": i} for i in range(cfg.sweep.optuna.workers)]}
    return {"parent": _grid_parent(cfg, settings, airflow), "items": grid(cfg)}


def _grid_parent(cfg: Config, settings: Settings, airflow: dict | None) -> str:
    from mlflow import MlflowClient

    from pipeline.tracking import store

    experiment = store.configure(settings, cfg.tracking.experiment)
    tags = {
        "mlflow.runName": f"sweep-{cfg.base.dataset}-{len(grid(cfg))}-trials",
        "sweep.grid": json.dumps(cfg.sweep.model_dump()),
        **{f"airflow.{k}": str(v) for k, v in (airflow or {}).items()},
    }
    return MlflowClient().create_run(experiment, tags=tags).info.run_id


def trial_stage(
    cfg: Config,
    settings: Settings,
    validation: dict,
    parent: str,
    item: dict,
    airflow: dict | None = None,
) -> dict:
    """One item of `start`: an Optuna worker, or one grid point trained and evaluated as a
    child run of `parent`."""
    if "worker" in item:
        from pipeline.stages import search

        return search.worker(cfg, settings, validation, parent, item["worker"], airflow)
    from pipeline.stages.evaluate import evaluate_stage
    from pipeline.stages.train import train_stage

    trial = trial_config(cfg, item)
    tags = {"mlflow.parentRunId": parent, SWEEP_TAG: parent}
    trained = train_stage(
        trial, settings, validation, airflow, resume=True, extra_tags=tags, handoff=False
    )
    scores = evaluate_stage(trial, settings, trained["run_id"], handoff=False)
    return {"run_id": trained["run_id"], "overrides": item, **scores}


def plot_dir(settings: Settings):
    folder = settings.outputs / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def finish(cfg: Config, settings: Settings, parent: str, results: list[dict]) -> dict:
    """Rank the trials; log the table, plots and the best trial on the parent run, and close
    it. Grid: by the promotion metric, learning curves overlaid; Optuna: `search.finish`."""
    if cfg.sweep.strategy == "optuna":
        from pipeline.stages import search

        return search.finish(cfg, settings, parent)
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking import store
    from pipeline.training import plots

    store.configure(settings, cfg.tracking.experiment)
    client = MlflowClient()
    metric = cfg.register_.metric
    ranked = sorted(results, key=lambda r: r[metric], reverse=True)
    best = ranked[0]
    histories = {
        _label(r["overrides"]): mlflow.artifacts.load_dict(f"runs:/{r['run_id']}/history.json")[
            "history"
        ]
        for r in ranked
    }
    plot = plots.plot_sweep(histories, plot_dir(settings) / "sweep_curves.png")
    client.log_artifact(parent, str(plot), "plots")
    client.log_dict(parent, {"metric": metric, "trials": ranked}, "sweep_results.json")
    client.log_text(parent, _table(ranked, metric), "sweep_results.md")
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
    lines = [f"| rank | trial | {metric} | run |", "|---|---|---|---|"]
    lines += [
        f"| {i} | {_label(r['overrides'])} | {r[metric]:.4f} | {r['run_id']} |"
        for i, r in enumerate(ranked, start=1)
    ]
    return "\n".join(lines) + "\n"
