"""The five stages as plain functions `(config, settings, inputs) -> small JSON-able dict`.

The CLI, dvc.yaml and the Airflow DAG all call these, so the three ways to run give the same
results. What one stage hands the next is a reference (data md5, MLflow run id), never data.
"""

from __future__ import annotations

import hashlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.config import Config, ConfigError
from pipeline.data import DataError, check_data, read_dataset
from pipeline.data.store import read_meta
from pipeline.settings import Settings

SYSTEM_METRICS_INTERVAL_S = 2.0


def _write_json(path: Path, payload: dict) -> None:
    """Atomic, so a crash never leaves a half-written hand-off file for the next stage."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write (a full disk): no 0-byte leftover


def check_data_stage(cfg: Config, settings: Settings) -> dict:
    return check_data(cfg.base.dataset, settings.root, settings.data_dir)


def validate_stage(cfg: Config, settings: Settings, airflow: dict | None = None) -> dict:
    """Validate data/ (which must match data.dvc); raise `ValidationFailed` on any failure.

    A failure is also put on record in MLflow: a FAILED run with the summary and the Data Docs.
    """
    from pipeline.validate import ValidationFailed, validate_dataset

    data = check_data(cfg.base.dataset, settings.root, settings.data_dir)
    ds = read_dataset(settings.data_dir)
    reference, notes = _drift_reference(cfg, settings, ds.name)
    report = validate_dataset(
        ds, read_meta(settings.data_dir), cfg.validate_, settings.outputs / "gx", reference, notes
    )
    result = {**report.to_dict(), "data_md5": data["data_md5"], "dataset": ds.name}
    _write_json(settings.outputs / "validation.json", result)
    print(report.describe())
    if not report.success:
        _record_failed_validation(cfg, settings, result, airflow)
        raise ValidationFailed(report)
    return result


def _drift_reference(cfg: Config, settings: Settings, dataset: str) -> tuple[dict | None, list]:
    """The champion's training-data statistics for the drift bounds, or None and why not."""
    if not cfg.validate_.drift_max_shift:
        return None, []
    from mlflow import MlflowClient

    from pipeline import promotion, registry

    registry.configure(settings, cfg.tracking.experiment)
    client = MlflowClient()
    champion = promotion.alias_version(client, cfg.register_.model_name, promotion.CHAMPION)
    if champion is None:
        return None, ["drift not checked: no champion yet"]
    run, where = registry.run_or_none(client, champion.run_id), f"champion v{champion.version}"
    if run is None:
        return None, [f"drift not checked: the run of {where} was deleted"]
    tags = run.data.tags
    if tags.get("data.dataset") != dataset:
        return None, [f"drift not checked: {where} was trained on {tags.get('data.dataset')}"]
    try:
        reference = {k: float(tags[f"data_stats.train.{k}"]) for k in ("pixel_mean", "contrast")}
    except KeyError:
        return None, [f"drift not checked: {where} has no training-data statistics"]
    return reference, [f"drift checked against {where}'s training data"]


def _record_failed_validation(cfg: Config, settings: Settings, result: dict, airflow) -> None:
    import mlflow

    from pipeline import lineage, registry
    from pipeline.validate import summary

    registry.configure(settings, cfg.tracking.experiment)
    metrics, tags = summary(result)
    tags |= {
        "data.md5": result["data_md5"],
        "data.dataset": result["dataset"],
        "git.commit": lineage.git_state(settings.code)[0],
        "params.hash": cfg.params_hash(),
        **{f"airflow.{k}": str(v) for k, v in (airflow or {}).items()},
    }
    mlflow.start_run(run_name=f"validation-failed-{result['dataset']}", tags=tags)
    try:
        mlflow.log_metrics(metrics)
        mlflow.log_dict(result, "validation.json")
        if Path(result["docs"]).is_file():
            mlflow.log_artifacts(str(Path(result["docs"]).parent), "data_docs")
    finally:
        mlflow.end_run(status="FAILED")


def unchanged_stage(cfg: Config, settings: Settings, data_md5: str) -> dict:
    """Whether the champion was trained on this data version, these params and this commit:
    retraining would only reproduce it. Uncommitted code changes never count as unchanged."""
    from mlflow import MlflowClient

    from pipeline import lineage, promotion, registry

    registry.configure(settings, cfg.tracking.experiment)
    client = MlflowClient()
    champion = promotion.alias_version(client, cfg.register_.model_name, promotion.CHAMPION)
    if champion is None:
        return {"unchanged": False, "reason": "no champion yet"}
    run, where = registry.run_or_none(client, champion.run_id), f"champion v{champion.version}"
    if run is None:
        return {"unchanged": False, "reason": f"the run of {where} was deleted"}
    tags = run.data.tags
    commit, dirty = lineage.git_state(settings.code)
    if dirty or tags.get("git.dirty") != "false":
        return {"unchanged": False, "reason": "uncommitted code changes (here or in " + where + ")"}
    now = {"data md5": data_md5, "params hash": cfg.params_hash(), "git commit": commit}
    then = {
        "data md5": tags.get("data.md5"),
        "params hash": tags.get("params.hash"),
        "git commit": tags.get("git.commit"),
    }
    differs = [key for key in now if now[key] != then[key]]
    if differs:
        return {"unchanged": False, "reason": f"not the same {', '.join(differs)} as {where}"}
    return {
        "unchanged": True,
        "reason": f"same data md5 {data_md5}, params hash {now['params hash']} and git commit "
        f"{commit[:12]} as {where} (run {champion.run_id})",
        "champion_version": int(champion.version),
        "champion_run_id": champion.run_id,
        "data_md5": data_md5,
        "git_commit": commit,
    }


def record_skip(cfg: Config, settings: Settings, decision: dict, airflow: dict | None) -> str:
    """A run that did not train, on record with its reason, so the schedule's history has no gap."""
    import mlflow

    from pipeline import registry

    registry.configure(settings, cfg.tracking.experiment)
    tags = {
        "pipeline.skipped": "true",
        "skip.reason": decision["reason"],
        "skip.champion_run_id": decision["champion_run_id"],
        "data.md5": decision["data_md5"],
        "git.commit": decision["git_commit"],
        "params.hash": cfg.params_hash(),
        **{f"airflow.{k}": str(v) for k, v in (airflow or {}).items()},
    }
    with mlflow.start_run(run_name="skipped-unchanged", tags=tags) as run:
        return run.info.run_id


def train_stage(
    cfg: Config,
    settings: Settings,
    validation: dict,
    airflow: dict | None = None,
    resume: bool = False,
    extra_tags: dict | None = None,
) -> dict:
    """Train on validated, tracked data and log everything to an MLflow run.

    Every epoch is checkpointed. With `resume`, a checkpoint of the same params, data and (under
    Airflow) DAG run continues where it stopped, logging into the same MLflow run. Under torchrun
    only rank 0 touches MLflow and writes files.
    """
    from pipeline import checkpoint, distributed
    from pipeline.train import fit

    data = check_data(cfg.base.dataset, settings.root, settings.data_dir)
    if not validation.get("success") or validation.get("data_md5") != data["data_md5"]:
        raise DataError(
            f"data version {data['data_md5']} has not passed validation (last validated: "
            f"{validation.get('data_md5')}, success={validation.get('success')}); "
            "run `pipeline validate` first"
        )
    ds = read_dataset(settings.data_dir, mmap=True)
    identity = _training_identity(cfg, data["data_md5"], airflow)
    ckpt_path = settings.checkpoints / f"{identity}.pt"
    state = None
    if ckpt_path.exists():
        if resume:
            state = checkpoint.load(ckpt_path)
        elif distributed.context().main:
            print(
                f"note: {ckpt_path} holds an interrupted run of these params and data; "
                "`pipeline train --resume` continues it. Starting a new run.",
                file=sys.stderr,
            )
    if not distributed.context().main:
        fit(cfg.train, ds.train, ds.classes, cfg.base.seed, resume=state)
        return {}

    import mlflow

    with _tracked_run(cfg, settings, ds, validation, airflow, state, extra_tags) as run:
        result = fit(
            cfg.train,
            ds.train,
            ds.classes,
            cfg.base.seed,
            on_epoch=log_epoch,
            checkpoint_path=ckpt_path,
            resume=state,
            checkpoint_extra={"mlflow_run_id": run.info.run_id, "identity": identity},
        )
        model_uri = _log_model(result, ds)
        mlflow.set_tag("train.stopped_early", str(result.stopped_early).lower())
    ckpt_path.unlink(missing_ok=True)  # the logged model is the durable copy now
    out = {"run_id": run.info.run_id, "model_uri": model_uri, "data_md5": data["data_md5"]}
    _write_json(settings.outputs / "train.json", out)
    return out


def _training_identity(cfg: Config, data_md5: str, airflow: dict | None) -> str:
    """Same params + data (+ DAG run) -> same checkpoint file; anything else never resumes it."""
    scope = f"{airflow['dag_id']}/{airflow['run_id']}" if airflow else "cli"
    key = f"{cfg.params_hash()}:{data_md5}:{scope}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@contextmanager
def _tracked_run(cfg, settings, ds, validation, airflow, state, extra_tags=None):
    """A new MLflow run, or the checkpoint's run reopened.

    Metrics go out once per epoch (`log_epoch`); the system-metrics thread samples CPU and memory
    (and GPU with nvidia-ml-py) every few seconds.
    """
    import mlflow
    from mlflow import MlflowClient

    from pipeline import distributed, lineage, registry

    registry.configure(settings, cfg.tracking.experiment)
    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    mlflow.set_system_metrics_samples_before_logging(1)
    from pipeline.data.versioning import pointer
    from pipeline.validate import summary

    record = lineage.record(
        settings.code, cfg, pointer(settings.root), validation, _device_name(cfg), airflow
    )
    tags = {
        **lineage.tags(record),
        "train.processes": str(distributed.context().world),
        **(extra_tags or {}),  # e.g. mlflow.parentRunId for a sweep trial, reproduce.of
    }
    client = MlflowClient()
    run_id = state["mlflow_run_id"] if state else None
    resuming = run_id is not None and _run_exists(client, run_id)
    if resuming:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
    else:
        t = cfg.train
        run_name = (
            f"{ds.name}-{t.model.name}-{t.optimizer.name}-{t.schedule.name}-lr{t.optimizer.lr:g}"
        )
        run = mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=True)

    with run:
        mlflow.log_dict(record, lineage.ARTIFACT)  # again on resume: the try number moved on
        if resuming:
            mlflow.set_tags({**tags, "train.resumed_from_epoch": str(state["epoch"])})
            print(f"resuming MLflow run {run_id} after epoch {state['epoch']}", file=sys.stderr)
        else:
            mlflow.log_params(cfg.flat())
            mlflow.log_metrics(summary(validation)[0])
            mlflow.log_dict(cfg.to_dict(), "config.json")
            if validation.get("docs") and Path(validation["docs"]).is_file():
                mlflow.log_artifacts(str(Path(validation["docs"]).parent), "data_docs")
        if state:  # epochs a killed process checkpointed but never got to log
            logged = {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}
            for row in state["history"]:
                if row["epoch"] not in logged:
                    log_epoch(row)
        yield run


def _device_name(cfg: Config) -> str:
    import torch

    from pipeline.train import pick_device

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
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        return True
    except MlflowException:
        return False


def _log_model(result, ds) -> str:
    """History, weights (state dict, loads with weights_only) and the pt2 MLflow model."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from pipeline import registry

    mlflow.log_dict({"history": result.history}, "history.json")
    registry.log_weights(result.model, result.spec)
    example = np.asarray(ds.test.images[:4], dtype=np.float32)
    with torch.no_grad():
        signature = infer_signature(example, result.model(torch.from_numpy(example)).numpy())
    info = mlflow.pytorch.log_model(
        result.model,
        name="model",
        input_example=example,
        signature=signature,
        serialization_format="pt2",
        # Stated, not inferred: inference imports the whole environment in a subprocess (20 s of
        # a 45 s `pipeline train` on digits) and lists packages the model never loads.
        pip_requirements=[
            *mlflow.pytorch.get_default_pip_requirements(),
            f"numpy=={np.__version__}",
        ],
    )
    mlflow.set_tag("model_uri", info.model_uri)
    return info.model_uri


def evaluate_stage(cfg: Config, settings: Settings, run_id: str) -> dict:
    """Score the run's model on the test split; metrics + plots to MLflow and outputs/."""
    import mlflow

    from pipeline import evaluate, registry

    data = check_data(cfg.base.dataset, settings.root, settings.data_dir)
    ds = read_dataset(settings.data_dir)
    registry.configure(settings, cfg.tracking.experiment)
    model, _ = registry.load_weights(run_id)
    preds = evaluate.predict(model, ds.test.images)
    scores = evaluate.metrics(ds.test.labels, preds, ds.classes)
    plots = settings.outputs / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    cm = evaluate.confusion(ds.test.labels, preds, len(ds.classes))
    history = mlflow.artifacts.load_dict(f"runs:/{run_id}/history.json")["history"]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(scores)
        mlflow.log_artifact(
            str(evaluate.plot_confusion(cm, ds.classes, plots / "confusion_matrix.png")), "plots"
        )
        mlflow.log_artifact(
            str(evaluate.plot_learning_curves(history, plots / "learning_curves.png")), "plots"
        )
    summary = {
        "test_accuracy": scores["test_accuracy"],
        "test_macro_f1": scores["test_macro_f1"],
        "data_md5": data["data_md5"],
    }
    _write_json(settings.outputs / "metrics.json", {**scores, "data_md5": data["data_md5"]})
    return {"run_id": run_id, **summary}


def _rescore(cfg: Config, settings: Settings, run_id: str) -> tuple[dict, str]:
    """A model's metrics on the current data's test split (a fair comparison even when the data
    changed), or ({}, how it differs) when it was built for other image shapes or classes."""
    from pipeline import evaluate, registry

    check_data(cfg.base.dataset, settings.root, settings.data_dir)
    ds = read_dataset(settings.data_dir)
    model, spec = registry.load_weights(run_id)
    mismatch = _mismatch(spec, ds)
    if mismatch:
        return {}, mismatch
    scores = evaluate.metrics(ds.test.labels, evaluate.predict(model, ds.test.images), ds.classes)
    return scores, ""


def _mismatch(spec: dict, ds) -> str:
    """How a model's inputs and classes differ from the dataset's; '' when they match."""

    def classes(names: list[str]) -> str:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        return f"{len(names)} classes [{shown}]"

    def shape(dims) -> str:
        return "x".join(str(d) for d in dims)

    parts = []
    if list(spec["classes"]) != list(ds.classes):
        parts.append(f"model: {classes(spec['classes'])}, data: {classes(ds.classes)}")
    if list(spec["shape"]) != list(ds.shape):
        parts.append(f"model input {shape(spec['shape'])}, data {shape(ds.shape)}")
    return "; ".join(parts)


def _gate(cfg: Config, settings: Settings, client, name: str, version: int, challenger: dict):
    """Decide against the current champion, re-read it right before the alias would move, and
    decide again if another promotion moved it meanwhile. Returns (decision, champion)."""
    from pipeline import promotion

    for _ in range(3):
        champion = promotion.alias_version(client, name, promotion.CHAMPION)
        if champion is not None and int(champion.version) == version:
            reason = f"v{version} is already champion (a retried task)"
            return promotion.Decision(True, "already_champion", reason), champion
        scored, mismatch = (
            (None, "") if champion is None else _rescore(cfg, settings, champion.run_id)
        )
        decision = promotion.decide(cfg.register_, challenger, scored, mismatch)
        now = promotion.alias_version(client, name, promotion.CHAMPION)
        if (now and now.version) == (champion and champion.version):
            return decision, champion
    raise RuntimeError(f"the champion of {name} kept moving during this promotion; run it again")


def _decided(client, name: str, version: int, run_id: str, decision, champion, cfg, by, data_md5):
    """Record the decision report (`data_md5`: the data both models were scored on); return the
    stage's small JSON result."""
    from datetime import UTC, datetime

    from pipeline import promotion, registry

    report = {
        "model": name,
        "version": version,
        "metric": cfg.register_.metric,
        "decision": decision.to_dict(),
        "champion_version": int(champion.version) if champion is not None else None,
        "data_md5": data_md5,
        "policy": cfg.register_.model_dump(),
        "by": by,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    registry.record_decision(
        client, name, version, run_id, report, promotion.report_markdown(report)
    )
    aliases = client.get_registered_model(name).aliases or {}
    return {
        "model_name": name,
        "version": version,
        "aliases": sorted(a for a, v in aliases.items() if int(v) == version),
        "promoted": decision.promote,
        "rule": decision.rule,
        "reason": decision.reason,
        **{k: v for k, v in decision.scores.items() if v is not None},
    }


def register_stage(
    cfg: Config, settings: Settings, run_id: str, airflow: dict | None = None
) -> dict:
    """Register the run's model (idempotent: a retry finds its version), alias it challenger,
    write its model card, and let the policy decide on champion. One promotion per model at a
    time; a version stays `pending` until all of this has happened."""
    from mlflow import MlflowClient

    from pipeline import lineage, model_card, promotion, registry

    name, by = cfg.register_.model_name, promotion.actor(airflow)
    with registry.reachable(settings), registry.promotion_lock(settings, name):
        registry.configure(settings, cfg.tracking.experiment)
        client = MlflowClient()
        run = client.get_run(run_id)
        metric = cfg.register_.metric
        if metric not in run.data.metrics:
            raise RuntimeError(f"run {run_id} has no {metric}; run `pipeline evaluate` first")
        record = lineage.of_run(run_id)
        found = registry.find_version(client, name, run_id)
        version = found or registry.create_version(
            client, name, run, {**lineage.tags(record), metric: str(run.data.metrics[metric])}
        )
        v = int(version.version)
        _, spec = registry.load_weights(run_id)
        config = client.download_artifacts(run_id, "config.json")
        card = model_card.render(
            name, v, record, json.loads(Path(config).read_text()), run.data.metrics, spec
        )
        client.log_text(run_id, card, "model_card.md")
        promotion.move_alias(client, name, promotion.CHALLENGER, v, "newest candidate", by)
        decision, champion = _gate(cfg, settings, client, name, v, run.data.metrics)
        if decision.promote:
            promotion.crown(client, name, v, decision.reason, by)
        md5 = run.data.tags.get("data.md5")
        out = _decided(client, name, v, run_id, decision, champion, cfg, by, md5)
        registry.complete(client, name, v)
    _write_json(settings.outputs / "registered.json", out)
    return out


def promote_stage(
    cfg: Config,
    settings: Settings,
    ref: str,
    reason: str | None = None,
    force: bool = False,
    airflow: dict | None = None,
) -> dict:
    """Make a registered version champion by hand: the same policy, both models scored on the
    current data version, unless `force` (which needs a reason, kept in the history)."""
    from mlflow import MlflowClient

    from pipeline import promotion, registry

    if force and not reason:
        raise ConfigError("--force needs --reason: it is recorded in the alias history")
    by = promotion.actor(airflow)
    with registry.reachable(settings):
        registry.configure(settings, cfg.tracking.experiment)
        client = MlflowClient()
        version = registry.resolve(client, ref)
        name, v = version.name, int(version.version)
        registry.require_complete(version)
        with registry.promotion_lock(settings, name):
            if force:
                champion = promotion.alias_version(client, name, promotion.CHAMPION)
                decision = promotion.Decision(True, "forced", f"forced: {reason}")
                md5 = None  # nothing was scored
            else:
                md5 = check_data(cfg.base.dataset, settings.root, settings.data_dir)["data_md5"]
                challenger, mismatch = _rescore(cfg, settings, version.run_id)
                if mismatch:
                    raise LookupError(
                        f"{name} v{v} was built for other inputs or classes than data/ holds "
                        f"({mismatch}); check out its data version first (`pipeline lineage`), "
                        "or --force"
                    )
                decision, champion = _gate(cfg, settings, client, name, v, challenger)
            if decision.promote:
                note = f" ({reason})" if reason and not force else ""
                promotion.crown(client, name, v, f"{decision.reason}{note}", by)
            return _decided(client, name, v, version.run_id, decision, champion, cfg, by, md5)
