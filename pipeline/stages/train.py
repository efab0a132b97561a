"""train: fit on validated, tracked data inside an MLflow run (new, or reopened on resume); log
the epochs, the weights and the MLflow model that serves them."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import interrupts
from pipeline.config import Config, ConfigError
from pipeline.context import RunContext
from pipeline.data import check_validated, read_dataset
from pipeline.settings import Settings

SYSTEM_METRICS_INTERVAL_S = 2.0


class Pruned(Exception):
    """Raised by an `on_epoch` callback to stop a trial early (a search's pruner)."""

    def __init__(self, epoch: int):
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch = epoch


def run(cfg: Config, settings: Settings, inputs: dict, ctx: RunContext) -> dict:
    """The graph's train stage: train on the validate stage's hand-off."""
    return train_stage(cfg, settings, inputs["validate"], ctx)


def train_stage(
    cfg: Config,
    settings: Settings,
    validation: dict,
    ctx: RunContext | None = None,
    on_epoch=None,
) -> dict:
    """Train on validated, tracked data and log everything to an MLflow run.

    Returns {"run_id", "data_md5"} ({"run_id", "pruned": True, "data_md5"} when
    `on_epoch` stopped it; {} in a torchrun worker: only rank 0 touches MLflow and files).
    SIGTERM or SIGINT (`interrupts.Interrupted`, any KeyboardInterrupt) ends the run KILLED and
    re-raises; a run of the same identity that a killed process left RUNNING is ended KILLED
    when the next one starts. Every epoch is checkpointed. With `ctx.resume`, a checkpoint of
    the same params, data, orchestrator run and `ctx.scope` continues where it stopped, logging
    into the same MLflow run. `on_epoch(row)` sees each epoch after it is logged; raising
    `Pruned` ends the run as KILLED, tagged with the epoch it stopped at. Raises DataError for
    untracked or unvalidated data, TrainingDiverged when the loss stays NaN/Inf.
    """
    ctx = ctx or RunContext()
    # DVC's comparison of data/ with data.dvc runs in a child process while torch loads.
    data = check_validated(
        cfg.base.dataset, settings.root, settings.data_dir, validation, wait=False
    )
    from pipeline.training import checkpoint, distributed
    from pipeline.training.engine import fit

    ds = read_dataset(settings.data_dir, mmap=True)
    identity = _training_identity(cfg, data["data_md5"], ctx)
    given = cfg
    if cfg.train.optimizer.lr == "auto":
        data["wait"]()
        cfg, lr_tags = _resolve_lr(cfg, settings, validation, ctx, identity)
        ctx = ctx.with_(tags=lr_tags)
    ckpt_path = settings.checkpoints / f"{identity}.pt"
    state = None
    if ckpt_path.exists():
        if ctx.resume:
            state = checkpoint.load(ckpt_path)
        elif distributed.context().main:
            print(
                f"note: {ckpt_path} holds an interrupted run of these params and data; "
                "`pipeline train --resume` continues it. Starting a new run.",
                file=sys.stderr,
            )
    data["wait"]()  # never train on data/ that differs from data.dvc
    if not distributed.context().main:
        fit(cfg.train, ds.train, ds.classes, cfg.base.seed, resume=state, contract=ds.contract)
        return {}

    tracking = _Tracking(cfg, given, settings, ds, validation, ctx, state, identity)

    def report(row: dict) -> None:
        tracking.activate()
        log_epoch(row)
        if on_epoch is not None:
            on_epoch(row)

    try:
        result = fit(
            cfg.train,
            ds.train,
            ds.classes,
            cfg.base.seed,
            on_epoch=report,
            checkpoint_path=ckpt_path,
            resume=state,
            checkpoint_extra={"mlflow_run_id": tracking.run_id, "identity": identity},
            contract=ds.contract,
        )
    except Pruned as stop:
        tracking.end("KILLED", {"sweep.pruned": "true", "sweep.pruned_at_epoch": str(stop.epoch)})
        ckpt_path.unlink(missing_ok=True)
        return {"run_id": tracking.run_id, "pruned": True, "data_md5": data["data_md5"]}
    except KeyboardInterrupt as stop:  # SIGINT, or SIGTERM as `interrupts.Interrupted`
        tracking.end("KILLED", {"train.interrupted": str(stop) or "interrupted by SIGINT"})
        raise  # the checkpoint stays: `--resume` continues it
    except BaseException:
        tracking.end("FAILED")
        raise
    # Trained: a signal now waits until the run is FINISHED with its model and the hand-off is
    # written (the CLI or task then stops), so no run is finished without the rest.
    with interrupts.deferred(check_on_exit=False):
        tracking.activate()
        _log_model(result, ds)
        stopped = str(result.stopped_early).lower()
        tracking.end("FINISHED", {"train.stopped_early": stopped, "train.loader": result.loader})
        ckpt_path.unlink(missing_ok=True)  # the logged model is the durable copy now
    return {"run_id": tracking.run_id, "data_md5": data["data_md5"]}


def _resolve_lr(cfg: Config, settings: Settings, validation: dict, ctx: RunContext, identity):
    """`lr: auto` -> the range test's suggestion (found again for the same identity, so a
    resumed run keeps its lr); the training run records the number as its lr param."""
    from pipeline.stages.lr_find import lr_find_stage
    from pipeline.training import distributed

    if distributed.context().world > 1:
        raise ConfigError(
            "train.optimizer.lr=auto is not run under torchrun; run `pipeline lr-find` and set "
            "train.optimizer.lr to its suggestion"
        )
    found = lr_find_stage(cfg, settings, validation, ctx, identity)
    lr = found["suggested_lr"]
    print(f"lr-find: lr {lr:.3g} ({found['method']}, run {found['run_id']})", file=sys.stderr)
    resolved = cfg.model_copy(deep=True)
    resolved.train.optimizer.lr = lr
    return resolved, {"lr_find.run_id": found["run_id"], "train.optimizer.lr_given": "auto"}


def _training_identity(cfg: Config, data_md5: str, ctx: RunContext) -> str:
    """Same params + data (+ orchestrator run, + scope) -> same checkpoint file; anything else
    never resumes it."""
    key = f"{cfg.params_hash()}:{data_md5}:{ctx.attempt()}:{ctx.scope}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _end_abandoned(client, experiment: str, identity: str, keep: str | None) -> None:
    """Runs of this identity left RUNNING by a process that no longer exists (SIGKILL, OOM):
    ended KILLED, saying so; `keep` is the run a resume reopens."""
    query = f"tags.`train.identity` = '{identity}' and attributes.status = 'RUNNING'"
    for left in client.search_runs([experiment], query):
        tags = left.data.tags
        if left.info.run_id != keep and interrupts.gone(
            tags.get("train.host"), tags.get("train.pid")
        ):
            why = f"process {tags['train.pid']} on {tags['train.host']} ended without closing it"
            client.set_tag(left.info.run_id, "train.interrupted", why)
            client.set_terminated(left.info.run_id, "KILLED")
            print(f"note: MLflow run {left.info.run_id} ended KILLED: {why}", file=sys.stderr)


class _Tracking:
    """The MLflow run of one training: a new run, or the checkpoint's run reopened, set up
    before the first epoch (`_open_run`), with the system-metrics sampler (CPU, memory, GPU with
    nvidia-ml-py, every few seconds). `activate()` makes it this thread's active run; `end()`
    closes it.

    Not in a thread beside the first epoch: a streaming loader forks its worker processes then,
    and a fork while another thread imports deadlocks the workers (an import lock is copied
    held); and beside the tutorial's MLP it saved nothing, both sharing the GIL.
    """

    def __init__(self, cfg, given, settings, ds, validation, ctx: RunContext, state, identity):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.run_id = _open_run(cfg, given, settings, ds, validation, ctx, state, identity)
        self.monitor = SystemMetricsMonitor(
            self.run_id, SYSTEM_METRICS_INTERVAL_S, 1, resume_logging=state is not None
        )
        self.monitor.start()
        self.active = False

    def activate(self) -> None:
        if not self.active:
            import mlflow

            mlflow.start_run(run_id=self.run_id)
            self.active = True

    def end(self, status: str, tags: dict | None = None) -> None:
        """Close the run as `status` with `tags`, its last system-metrics samples first."""
        import mlflow

        self.activate()
        if tags:
            mlflow.set_tags(tags)
        self.monitor.finish()
        mlflow.end_run(status)


def _open_run(cfg, given, settings, ds, validation, ctx: RunContext, state, identity) -> str:
    """The run id: a new run with its params, config, validation summary and Data Docs, or the
    checkpoint's run reopened with the epochs a killed process checkpointed but never logged.
    `cfg` is what trains (params and config.json: numbers only), `given` the config as asked
    for (its params hash is what skip-unchanged compares; it differs with `lr: auto`). The
    client API only: the run becomes active in `_Tracking.activate`."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from pipeline.data.validation import summary
    from pipeline.data.versioning import pointer
    from pipeline.tracking import lineage, store
    from pipeline.training import distributed

    experiment = store.configure(settings, cfg.tracking.experiment)
    record = lineage.record(
        settings.code, given, pointer(settings.root), validation, _device_name(cfg), ctx
    )
    tags = {
        **lineage.tags(record),
        "train.processes": str(distributed.context().world),
        "train.identity": identity,
        **{f"train.{key}": value for key, value in interrupts.owner().items()},
        **ctx.tags,  # e.g. mlflow.parentRunId for a sweep trial, reproduce.of
    }
    client = MlflowClient()
    run_id = state["mlflow_run_id"] if state else None
    _end_abandoned(client, experiment, identity, keep=run_id)
    resuming = run_id is not None and _run_exists(client, run_id)
    if resuming:
        for key, value in {**tags, "train.resumed_from_epoch": str(state["epoch"])}.items():
            client.set_tag(run_id, key, value)
        print(f"resuming MLflow run {run_id} after epoch {state['epoch']}", file=sys.stderr)
    else:
        t = cfg.train
        run_name = (
            f"{ds.name}-{t.model.name}-{t.optimizer.name}-{t.schedule.name}-lr{t.optimizer.lr:g}"
        )
        run_id = store.new_run(settings, cfg.tracking.experiment, ctx, run_name, tags)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in summary(validation)[0].items()]
        params = [Param(k, str(v)) for k, v in cfg.flat().items()]
        for start in range(0, max(len(params), 1), 100):  # MLflow takes 100 params a batch
            client.log_batch(run_id, metrics=metrics if start == 0 else [],
                             params=params[start : start + 100])  # fmt: skip
        client.log_dict(run_id, cfg.to_dict(), "config.json")
        if validation.get("docs") and Path(validation["docs"]).is_file():
            client.log_artifacts(run_id, str(Path(validation["docs"]).parent), "data_docs")
    client.log_dict(run_id, record, lineage.ARTIFACT)  # again on resume: the try moved on
    if state:  # epochs a killed process checkpointed but never got to log
        logged = {m.step for m in client.get_metric_history(run_id, "train_loss")}
        for row in state["history"]:
            if row["epoch"] not in logged:
                now = int(time.time() * 1000)
                metrics = [Metric(k, v, now, row["epoch"]) for k, v in row.items() if k != "epoch"]
                client.log_batch(run_id, metrics=metrics)
    return run_id


def _device_name(cfg: Config) -> str:
    import torch

    from pipeline.training.engine import pick_device

    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def log_epoch(row: dict) -> None:
    """One epoch's metrics to the active run in one batched call; never per step.

    Synchronous on purpose: MLflow's async queue cost ~40 % on a 3-epoch CPU run here, one
    batched write per epoch costs nothing measurable (`bench/engine.py`, tracking_overhead)."""
    import mlflow

    metrics = {k: v for k, v in row.items() if k != "epoch"}
    mlflow.log_metrics(metrics, step=row["epoch"])


def _run_exists(client, run_id: str) -> bool:
    """False also for a run deleted in the UI: MLflow cannot reopen it; a new run continues."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException:
        return False


def _log_model(result, ds) -> None:
    """History and weights (state dict + spec with the input contract, loads with weights_only)
    with an input example. The MLflow model that serves them is exported when the run is
    registered (`weights.export_model`): most runs (sweep trials, tests) never are, and the
    export is a third of a short run's fixed cost."""
    import mlflow

    from pipeline.tracking import weights

    history = {"history": result.history, "steps_per_epoch": result.steps_per_epoch}
    mlflow.log_dict(history, "history.json")
    weights.log_weights(result.model, result.spec, np.asarray(ds.test.images[:2]))
