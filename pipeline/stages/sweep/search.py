"""Optuna search (`sweep.strategy: optuna`): a seeded TPE study kept in a relational database
(SQLite beside MLflow's store, PostgreSQL in production), worker tasks that pull trials from it,
and a pruner fed each epoch's val_loss. Every trial is an MLflow child run under the sweep's
parent; a pruned one ends KILLED, tagged with the epoch it stopped at.

Re-running the sweep resumes the study of the same name (its parent run too) unless a new one is
asked for. A worker task that was killed and retried first fails the trial it left RUNNING and
enqueues the same parameters again, so the retry resumes that trial's checkpoint. A trial
interrupted by SIGTERM or SIGINT ends FAIL; one whose process died without a word (SIGKILL, on
this host) is failed when a worker of the study next starts.
"""

from __future__ import annotations

import json

from pipeline.config import Config, ConfigError
from pipeline.context import RunContext
from pipeline.settings import Settings
from pipeline.stages.sweep.common import (
    SWEEP_TAG,
    child,
    parent_run,
    plot_dir,
    rank,
    trial_config,
)

PARENT_ATTR = "mlflow_parent"  # the study's user attribute naming the sweep's parent run


def study_name(cfg: Config) -> str:
    return cfg.sweep.optuna.study or f"sweep-{cfg.base.dataset}"


def check_space(cfg: Config) -> None:
    """Every choice and bound of the space must be a valid value of its key, before any work."""
    for key, dim in cfg.sweep.optuna.space.items():
        for value in dim.choice if dim.choice is not None else (dim.low, dim.high):
            try:
                trial_config(cfg, {key: value})
            except ConfigError as exc:
                reason = str(exc).splitlines()[-1].strip()
                raise ConfigError(
                    f"sweep.optuna.space.{key}: {value!r} is refused ({reason})"
                ) from None


def open_study(cfg: Config, settings: Settings, new: bool = False, worker: int = 0):
    """The study, created or loaded; each worker samples with its own seed (`seed + worker`):
    the same seed in every worker draws the same first trials in each."""
    import optuna

    if settings.study_storage.startswith("sqlite:///"):
        settings.store.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    o = cfg.sweep.optuna
    pruners = {
        "hyperband": lambda: optuna.pruners.HyperbandPruner(1, cfg.sweep.epochs, 3),
        "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(1, 3),
        "none": optuna.pruners.NopPruner,
    }
    if new:
        try:
            optuna.delete_study(study_name=study_name(cfg), storage=settings.study_storage)
        except KeyError:
            pass  # nothing to start over from
    return optuna.create_study(
        study_name=study_name(cfg),
        storage=settings.study_storage,
        sampler=optuna.samplers.TPESampler(seed=o.seed + worker, n_startup_trials=o.startup_trials),
        pruner=pruners[o.pruner](),
        direction="minimize",  # the last epoch's val_loss
        load_if_exists=True,
    )


def start(cfg: Config, settings: Settings, ctx: RunContext, new: bool = False) -> dict:
    """The study (created, or resumed) and its parent run, RUNNING until `finish`; one item per
    worker (`sweep.optuna.workers`)."""
    from mlflow import MlflowClient

    from pipeline.tracking import store

    check_space(cfg)
    study = open_study(cfg, settings, new)
    store.configure(settings, cfg.tracking.experiment)
    client = MlflowClient()
    items = [{"worker": i} for i in range(cfg.sweep.optuna.workers)]
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent and store.run_or_none(client, parent) is not None:
        client.update_run(parent, "RUNNING")
        return {"parent": parent, "items": items}
    tags = {
        "sweep.strategy": "optuna",
        "sweep.study": study_name(cfg),
        "sweep.grid": cfg.sweep.optuna.model_dump_json(),
        SWEEP_TAG: "parent",
    }
    parent = parent_run(cfg, settings, ctx, f"search-{study_name(cfg)}", tags)
    study.set_user_attr(PARENT_ATTR, parent)
    return {"parent": parent, "items": items}


def trial(
    cfg: Config, settings: Settings, validation: dict, parent: str, item: dict, ctx: RunContext
) -> dict:
    """One worker (`item["worker"]`): see `worker`."""
    return worker(cfg, settings, validation, parent, item["worker"], ctx)


def worker(
    cfg: Config, settings: Settings, validation: dict, parent: str, index: int, ctx: RunContext
) -> dict:
    """Pull trials until the study holds `sweep.optuna.trials` finished or running ones."""
    from optuna.trial import TrialState

    from pipeline import interrupts

    study = open_study(cfg, settings, worker=index)
    me = f"{ctx.ids.get('run_id', 'cli')}/{index}"
    for left in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = left.user_attrs.get("owner") or {}
        if left.user_attrs.get("worker") == me:  # this task's killed try: do it again
            study.tell(left.number, state=TrialState.FAIL)
            study.enqueue_trial(left.params, user_attrs={"retry_of": left.number})
        elif interrupts.gone(owner.get("host"), owner.get("pid")):
            study.tell(left.number, state=TrialState.FAIL)
            print(f"note: trial {left.number} failed: its process {owner['pid']} died")
    done = []
    while _slots(study, cfg.sweep.optuna.trials):
        asked = study.ask()
        asked.set_user_attr("worker", me)
        asked.set_user_attr("owner", interrupts.owner())
        done.append(_run_trial(cfg, settings, validation, parent, asked, ctx))
    return {"worker": index, "trials": done}


def _slots(study, target: int) -> bool:
    from optuna.trial import TrialState

    taken = study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    )
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return len(taken) < target or bool(waiting)


def _sample(trial, space: dict) -> dict:
    values = {}
    for key, dim in space.items():
        if dim.choice is not None:
            values[key] = trial.suggest_categorical(key, dim.choice)
        elif float(dim.low).is_integer() and float(dim.high).is_integer() and not dim.log:
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high))
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log)
    return values


def _run_trial(cfg: Config, settings: Settings, validation: dict, parent: str, trial, ctx):
    """Train (and evaluate) one trial as a child run; report each epoch to the pruner."""
    from optuna.trial import TrialState

    from pipeline.errors import TrainingDiverged
    from pipeline.stages.evaluate import evaluate_stage
    from pipeline.stages.train import Pruned, train_stage

    overrides = {**_sample(trial, cfg.sweep.optuna.space), "train.epochs": cfg.sweep.epochs}
    seen: list[dict] = []

    def on_epoch(row: dict) -> None:
        seen.append(row)
        trial.report(row["val_loss"], row["epoch"])
        # after the last epoch the trial is complete: pruning would only discard its result
        if row["epoch"] < cfg.sweep.epochs and trial.should_prune():
            raise Pruned(row["epoch"])

    scope = f"search/{trial.user_attrs['worker']}"  # workers may draw the same params
    context = child(ctx, parent, scope, **{"sweep.trial": str(trial.number)})
    row = {"trial": trial.number, "overrides": overrides}
    config = trial_config(cfg, overrides)
    try:
        trained = train_stage(config, settings, validation, context, on_epoch)
        scores = (
            {} if trained.get("pruned") else evaluate_stage(config, settings, trained["run_id"])
        )
    except TrainingDiverged as exc:  # a bad point of the space, not a broken sweep
        trial.study.tell(trial, state=TrialState.FAIL)
        return {**row, "state": "failed", "reason": str(exc), "epochs": len(seen)}
    except KeyboardInterrupt as exc:  # SIGTERM / SIGINT: its run ended KILLED in train
        trial.set_user_attr("ended", str(exc) or "interrupted by SIGINT")
        trial.study.tell(trial, state=TrialState.FAIL)
        raise
    row |= {"run_id": trained["run_id"], "epochs": len(seen)}
    if trained.get("pruned"):
        trial.study.tell(trial, state=TrialState.PRUNED)
        return {**row, "state": "pruned"}
    last = seen[-1] if seen else {}
    trial.study.tell(trial, last.get("val_loss"))
    val = {"val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy")}
    return {**row, "state": "complete", **val, **scores}


def finish(cfg: Config, settings: Settings, parent: str, results: list | None = None) -> dict:
    """Rank the study's trials by val_loss (all of them, also those of earlier runs of the
    study: `results` is not needed); put the results table, the optimization history and the
    parameter importances on the parent run, and close it."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking import store

    study = open_study(cfg, settings)
    experiment = store.configure(settings, cfg.tracking.experiment)
    client = MlflowClient()
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    run_of = {int(r.data.tags["sweep.trial"]): r for r in reversed(children)}  # newest wins
    rows = [_row(t, run_of.get(t.number)) for t in study.get_trials(deepcopy=False)]
    complete = rank([r for r in rows if r["state"] == "complete"])
    if not complete:
        raise RuntimeError(f"study {study.study_name}: no trial completed; see the child runs")
    best = complete[0]
    trial_epochs = sum(r["epochs"] for r in rows)
    client.log_dict(parent, {"objective": "val_loss", "trials": rows}, "sweep_results.json")
    client.log_text(parent, _table(rows), "sweep_results.md")
    for path in _plots(study, plot_dir(settings)):
        client.log_artifact(parent, str(path), "plots")
    for key, value in (("best_val_loss", best["val_loss"]), ("trial_epochs", trial_epochs)):
        client.log_metric(parent, key, value)
    client.set_tag(parent, "sweep.best_run_id", best["run_id"])
    client.set_tag(parent, "sweep.best", json.dumps(best["params"]))
    client.set_terminated(parent)
    mlflow.end_run()
    pruned = sum(r["state"] == "pruned" for r in rows)
    return {"parent_run_id": parent, "best": best, "trials": len(rows), "pruned": pruned,
            "trial_epochs": trial_epochs}  # fmt: skip


def _row(trial, run) -> dict:
    metrics = run.data.metrics if run else {}
    return {
        "trial": trial.number,
        "state": trial.state.name.lower(),
        "params": trial.params,
        "val_loss": trial.value,
        "val_accuracy": metrics.get("val_accuracy"),
        "test_accuracy": metrics.get("test_accuracy"),
        "epochs": len(trial.intermediate_values),
        "run_id": run.info.run_id if run else None,
    }


def _table(rows: list[dict]) -> str:
    def fmt(value):
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [
        "| trial | state | epochs | val_loss | val_accuracy | params | run |",
        "|" + "---|" * 7,
    ]
    for r in rows:
        params = ", ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in r["params"].items())
        lines.append(
            f"| {r['trial']} | {r['state']} | {r['epochs']} | {fmt(r['val_loss'])} | "
            f"{fmt(r['val_accuracy'])} | {params} | {r['run_id'] or '-'} |"
        )
    return "\n".join(lines) + "\n"


def _plots(study, folder):
    """The optimization history and the parameter importances (when two trials completed)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as views

    made = []
    for name, view in (("optimization_history", views.plot_optimization_history),
                       ("param_importances", views.plot_param_importances)):  # fmt: skip
        try:
            with warnings.catch_warnings():  # Optuna's matplotlib views are "experimental"
                warnings.simplefilter("ignore", ExperimentalWarning)  # since v2.2; the PNG is ours
                axes = view(study)
        except (RuntimeError, ValueError):  # too few complete trials for importances
            continue
        path = folder / f"search_{name}.png"
        axes.figure.set_size_inches(7, 4.5)
        axes.figure.tight_layout()
        axes.figure.savefig(path, dpi=100)
        plt.close(axes.figure)
        made.append(path)
    return made
