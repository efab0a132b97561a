"""train: fit on validated, tracked data inside an MLflow run (new, or reopened on resume); log
the epochs, the weights and the MLflow model that serves them."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline import interrupts
from pipeline.config import Config, ConfigError
from pipeline.context import RunContext
from pipeline.data import check_validated, read_dataset
from pipeline.settings import Settings
from pipeline.tracking import recorder

# DP-SGD's guarantee, on the run as params and tags; register copies the tags to the version.
PRIVACY_TAGS = ("privacy.epsilon", "privacy.delta")


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
    recipe=None,
) -> dict:
    """Train on validated, tracked data and log everything to an MLflow run.

    Returns {"run_id", "data_md5"} ({"run_id", "pruned": True, "data_md5"} when
    `on_epoch` stopped it). Under torchrun only rank 0 touches MLflow and checkpoints; the first
    process of every other machine returns rank 0's result too (its hand-off), the others {}.
    SIGTERM or SIGINT (`interrupts.Interrupted`, any KeyboardInterrupt) ends the run KILLED and
    re-raises; a run of the same identity that a killed process left RUNNING is ended KILLED
    when the next one starts. Every epoch is checkpointed, locally and (off the training thread,
    before its metrics) into the MLflow run. With `ctx.resume`, a checkpoint of the same params,
    data, orchestrator run and `ctx.scope` continues where it stopped, logging into the same
    MLflow run: the local one, else the one an earlier try uploaded from another host.
    `on_epoch(row)` sees each epoch after it went to the recorder; raising `Pruned` ends the
    run as KILLED, tagged with the epoch it stopped at. `recipe(dataset)` gives more arguments
    for the engine's `fit` (a `loss` hook, a `start` model: the compress stage); its identity
    goes in `ctx.scope`. With train.privacy, each epoch's `epsilon` is a metric and the final
    guarantee (`privacy.epsilon`, `privacy.delta`, the noise multiplier, ...) run params and
    tags. Raises DataError for untracked or unvalidated data, TrainingDiverged when the loss
    stays NaN/Inf.
    """
    ctx = ctx or RunContext()
    with recorder.begin() as tracking:  # a child process imports MLflow meanwhile
        return _train(cfg, settings, validation, ctx, on_epoch, recipe, tracking)


def _train(cfg, settings, validation, ctx, on_epoch, recipe, tracking) -> dict:
    from pipeline.training import distributed

    dist = distributed.context()
    if dist.enabled:  # the other machines have no hand-off of rank 0's workspace
        from pipeline.training.engine import pick_device

        distributed.init(dist, pick_device(cfg.train.device, dist.local_rank))
        validation = distributed.first(validation, dist) or {}
        # every machine must train the same recipe (its params.yaml and --set are its own), and
        # resume or not alike: rank 0 alone decides, so a --resume elsewhere would be dropped
        what = "the training params (params hash) and --resume"
        distributed.agree((cfg.params_hash(), ctx.resume), what, dist)
    # DVC's comparison of data/ with data.dvc runs in a child process while torch loads.
    data = check_validated(
        cfg.base.dataset, settings.root, settings.data_dir, validation, wait=False
    )
    from pipeline.training import checkpoint
    from pipeline.training.engine import fit

    ds = read_dataset(settings.data_dir, mmap=True)
    if cfg.train.privacy.enabled:  # refused before a run is opened, not as a FAILED one
        from pipeline.training import privacy
        from pipeline.training.batches import split_validation

        rows, _ = split_validation(ds.train, cfg.train.val_fraction, cfg.base.seed)
        privacy.plan(cfg.train, len(rows))
    identity = _training_identity(cfg, data["data_md5"], ctx)
    given = cfg
    if cfg.train.optimizer.lr == "auto":
        data["wait"]()
        cfg, lr_tags = _resolve_lr(cfg, settings, validation, ctx, identity)
        ctx = ctx.with_(tags=lr_tags)
    ckpt_path = settings.checkpoints / f"{identity}.pt"
    state = None
    if dist.main:  # the other ranks start from rank 0's checkpoint, whatever their disk holds
        if ctx.resume and not ctx.first_try:
            # a leftover of a run that finished elsewhere, or an earlier try on another host
            state = recorder.settle_checkpoint(
                settings, cfg.tracking.experiment, identity, ckpt_path
            )
        elif ckpt_path.exists():
            if ctx.resume:
                state = checkpoint.load(ckpt_path)
            else:
                print(
                    f"note: {ckpt_path} holds an interrupted run of these params and data; "
                    "`pipeline train --resume` continues it. Starting a new run.",
                    file=sys.stderr,
                )
    state = distributed.share(state, dist)
    data["wait"]()  # never train on data/ that differs from data.dvc
    more = recipe(ds) if recipe is not None else {}
    if not dist.main:
        fit(cfg.train, ds.train, ds.classes, cfg.base.seed, resume=state, contract=ds.contract,
            **more)  # fmt: skip
        finished = distributed.share(None, dist)  # rank 0's result, once its run is logged
        return finished if dist.local_rank == 0 else {}  # one hand-off per machine
    resume = {k: state[k] for k in ("mlflow_run_id", "epoch", "history")} if state else None
    tracking.open(recorder.Opening(
        cfg, given, settings, validation, ctx, ds.name, identity, _device_name(cfg),
        dist.world, interrupts.owner(), resume,
    ))  # fmt: skip

    tracking.check()  # an opening that failed already (a deleted experiment) stops us here

    def report(row: dict) -> None:
        tracking.epoch(row, ckpt_path)  # its checkpoint, written just before: uploaded first
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
            # called at the first checkpoint: the recorder opens the run meanwhile
            checkpoint_extra=lambda: {"mlflow_run_id": tracking.run_id, "identity": identity},
            contract=ds.contract,
            **more,
        )
    except Pruned as stop:
        pruned = {"sweep.pruned": "true", "sweep.pruned_at_epoch": str(stop.epoch)}
        tracking.end("KILLED", pruned, keep_checkpoint=False)  # a pruned trial never resumes
        ckpt_path.unlink(missing_ok=True)
        return {"run_id": tracking.run_id, "pruned": True, "data_md5": data["data_md5"]}
    except KeyboardInterrupt as stop:  # SIGINT, or SIGTERM as `interrupts.Interrupted`
        tracking.abort("KILLED", {"train.interrupted": str(stop) or "interrupted by SIGINT"})
        raise  # the checkpoint stays: `--resume` continues it
    except BaseException:
        tracking.abort("FAILED")
        raise
    # Trained: a signal now waits until the run is FINISHED with its model and the hand-off is
    # written (the CLI or task then stops), so no run is finished without the rest.
    with interrupts.deferred(check_on_exit=False), tempfile.TemporaryDirectory() as folder:
        _save_model(result, ds, Path(folder))
        stopped = str(result.stopped_early).lower()
        tags = {"train.stopped_early": stopped, "train.loader": result.loader}
        tags["train.last_batch"] = result.last_batch
        guarantee = {f"privacy.{k}": v for k, v in (result.privacy or {}).items()}
        tags |= {k: str(v) for k, v in guarantee.items() if k in PRIVACY_TAGS}
        tracking.end("FINISHED", tags, artifacts=Path(folder), params=guarantee)
        ckpt_path.unlink(missing_ok=True)  # the logged model is the durable copy now
    finished = {"run_id": tracking.run_id, "data_md5": data["data_md5"]}
    return distributed.share(finished, dist)  # every machine hands on the run it trained


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


def _device_name(cfg: Config) -> str:
    import torch

    from pipeline.training.engine import pick_device

    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _save_model(result, ds, folder: Path) -> None:
    """History and weights (state dict + spec with the input contract, loads with weights_only)
    with an input example, laid out for the recorder. The MLflow model that serves them is
    exported when the run is registered (`weights.export_model`): most runs (sweep trials,
    tests) never are, and the export is a third of a short run's fixed cost."""
    from pipeline.tracking import weights

    history = {"history": result.history, "steps_per_epoch": result.steps_per_epoch}
    (folder / "history.json").write_text(json.dumps(history, indent=2))
    weights.save_weights(result.model, result.spec, np.asarray(ds.test.images[:2]), folder)
