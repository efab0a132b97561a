"""compress: smaller, faster challengers made from a teacher (distill, prune, quantize), each its
own MLflow run linked to the teacher, evaluated on the same test split, measured beside the
teacher in one process and registered through the promotion policy like any model."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline import choices, interrupts
from pipeline.config import Config, ConfigError, PrivacyConfig, resolved_config
from pipeline.context import RunContext
from pipeline.settings import Settings


@dataclass(frozen=True)
class Teacher:
    run_id: str
    model: str  # NAME/VERSION when registered, else ""
    config: Config  # the resolved config it was trained with (lr: auto as the number used)
    metrics: dict  # its logged scores (test_accuracy, ...)
    tags: dict  # its run's tags (a compressed teacher names its own teacher)


def run(cfg: Config, settings: Settings, inputs: dict, ctx: RunContext) -> dict:
    """The graph's compress stage: the train stage's run (registered by the register stage) is
    the teacher unless compress.teacher names one."""
    return compress_stage(cfg, settings, inputs["validate"], inputs["train"]["run_id"], ctx)


def compress_stage(
    cfg: Config,
    settings: Settings,
    validation: dict,
    trained_run_id: str | None = None,
    ctx: RunContext | None = None,
) -> dict:
    """Run each method of `compress.methods` on the teacher (`compress.teacher`, else
    `trained_run_id`): a run per result with the teacher's lineage, its test scores (evaluate),
    its parameters, file bytes, MACs, latency and throughput beside the teacher's, its
    explanations (explain.methods, gradient-free ones for int8), and, with
    compress.register, a registered version decided by the promotion policy.

    Returns {"teacher": {"run_id", "model"}, "results": [{"method", "run_id", figures...,
    "registered": register's result or None}]}; {"teacher": None, "results": []} when no
    method is asked for. Raises DataError for unvalidated data, LookupError for a teacher that
    does not resolve, ConfigError for a teacher no method can take (an ONNX model)."""
    ctx = ctx or RunContext()
    if not cfg.compress.methods:
        print("compress: compress.methods is [], nothing to do", file=sys.stderr)
        return {"teacher": None, "results": []}
    from pipeline.stages.evaluate import evaluate_stage
    from pipeline.stages.explain import explain_stage
    from pipeline.stages.register import register_stage

    teacher = _teacher(cfg, settings, trained_run_id)
    _preflight(cfg, teacher)  # every method's refusal before any run exists
    measured: dict = {}  # the teacher's figures, measured once for every result
    results = []
    for method in cfg.compress.methods:
        settings_ = getattr(cfg.compress, method).model_dump()
        scope = _scope(ctx, method, teacher, settings_, validation.get("data_md5"))
        tags = {
            "compress.method": method,
            "compress.teacher_run_id": teacher.run_id,
            "compress.teacher_model": teacher.model,
            "compress.scope": scope,
            **{f"compress.{method}.{k}": json.dumps(v) for k, v in settings_.items()},
            **_privacy_note(teacher, method),
            "mlflow.runName": f"{cfg.base.dataset}-{teacher.config.train.model.name}-{method}",
        }
        made = ctx.with_(scope=scope, tags=tags)
        done = _finished(cfg, settings, scope) if ctx.resume else None
        if done is not None:
            print(f"compress: {method}: run {done.info.run_id} finished already", file=sys.stderr)
            run_id, figures = done.info.run_id, dict(done.data.metrics)
        else:
            print(f"compress: {method} from {teacher.model or teacher.run_id}", file=sys.stderr)
            make = choices.load(choices.COMPRESSIONS, method)
            run_id = make(cfg, settings, validation, teacher, made)
            scores = evaluate_stage(cfg, settings, run_id)
            figures = scores | measure(cfg, run_id, teacher, measured)
            explain_stage(cfg, settings, run_id)  # before register: the card shows it
        registered = register_stage(cfg, settings, run_id, made) if cfg.compress.register_ else None
        shown = ("test_accuracy", *efficiency_keys())
        results.append(
            {
                "method": method,
                "run_id": run_id,
                **{k: figures[k] for k in shown if k in figures},
                "registered": registered,
            }
        )
    return {"teacher": {"run_id": teacher.run_id, "model": teacher.model}, "results": results}


def _teacher(cfg: Config, settings: Settings, trained_run_id: str | None) -> Teacher:
    import mlflow

    from pipeline.registry import versions
    from pipeline.tracking import server, store

    with server.reachable(settings):
        store.configure(settings, cfg.tracking.experiment)
        client = mlflow.MlflowClient()
        if cfg.compress.teacher:
            try:
                version = versions.resolve(client, cfg.compress.teacher)
            except LookupError as exc:
                raise LookupError(f"compress.teacher {cfg.compress.teacher!r}: {exc}") from None
            run_id, model = version.run_id, f"{version.name}/{version.version}"
        elif trained_run_id:
            run_id = trained_run_id
            found = versions.find_version(client, cfg.register_.model_name, run_id)
            model = f"{found.name}/{found.version}" if found else ""
        else:
            raise ConfigError("compress needs a teacher: set compress.teacher (NAME@champion)")
        run = store.active_run(client, run_id)
        trained = resolved_config(mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json"))
    return Teacher(run_id, model, trained, dict(run.data.metrics), dict(run.data.tags))


def _scope(ctx: RunContext, method: str, teacher: Teacher, settings_: dict, data: str) -> str:
    """One result's identity (method, its settings, teacher, data, orchestrator run): keeps
    checkpoints apart, so a resumed distillation continues its own, never another teacher's;
    and finds a result that a retry need not make again (`_finished`)."""
    key = json.dumps(
        [ctx.scope, ctx.attempt(), method, teacher.run_id, settings_, data], sort_keys=True
    )
    return f"compress-{method}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _finished(cfg: Config, settings: Settings, scope: str):
    """The FINISHED, measured run of this result's identity, or None."""
    from pipeline.tracking import store

    experiment = store.configure(settings, cfg.tracking.experiment)
    query = f"tags.`compress.scope` = '{scope}' and attributes.status = 'FINISHED'"
    found = store.client(settings).search_runs(
        [experiment], query, order_by=["attributes.start_time DESC"]
    )
    return next((r for r in found if "params" in r.data.metrics), None)


def efficiency_keys() -> tuple[str, ...]:
    """The figures `measure` logs, in the order results show them."""
    mine = ("params", "model_bytes", "macs", "latency_p50_ms", "latency_p95_ms", "throughput")
    return (*mine, *(f"teacher_{k}" for k in mine), "teacher_test_accuracy",
            *(f"float_onnx_{k}" for k in mine[3:]))  # fmt: skip


def _teacher_network(teacher: Teacher, dataset):
    """The teacher's PyTorch network and spec; ConfigError for an ONNX teacher (no gradients,
    no channels to remove) and LookupError for one built for other inputs than data/."""
    from pipeline.tracking import weights
    from pipeline.training.runtime import OnnxModel

    model, spec = weights.load_weights(teacher.run_id)
    if isinstance(model, OnnxModel):
        made_from = teacher.tags.get("compress.teacher_model") or "the float model it came from"
        raise ConfigError(
            f"the teacher {teacher.model or teacher.run_id} is an int8 ONNX model: distill, "
            f"prune and quantize need a PyTorch one; set compress.teacher={made_from}"
        )
    if dataset is not None:
        spec.require_fits(dataset, f"the teacher {teacher.model or teacher.run_id}")
    return model, spec


def _preflight(cfg: Config, teacher: Teacher) -> None:
    """Refuse what a method would refuse later, before any method runs: an ONNX teacher, a
    prune budget out of reach, a distill student not smaller than the teacher (ConfigError)."""
    from pipeline.training import compression
    from pipeline.training.models import ModelSpec, rebuild

    network, spec = _teacher_network(teacher, None)
    if "prune" in cfg.compress.methods:
        compression.prune(network, spec, cfg.compress.prune)  # raises for a budget out of reach
    if "distill" in cfg.compress.methods:
        student = cfg.compress.distill.student.model_dump()
        size = sum(p.numel() for p in rebuild(ModelSpec(student, spec.shape, spec.classes, 0, 1))
                   .parameters())  # fmt: skip
        teacher_size = sum(p.numel() for p in network.parameters())
        if size >= teacher_size:
            raise ConfigError(
                f"compress.distill.student ({student['name']}, hidden {student['hidden']}) has "
                f"{size:,} parameters, not fewer than the teacher's {teacher_size:,}: a student "
                "must be smaller; pick a smaller model or hidden width"
            )


def _recipe_config(cfg: Config, teacher: Teacher) -> Config:
    """The teacher's training recipe (train block, as resolved) under this config's base,
    tracking and register settings; never DP-SGD (`_privacy_note`)."""
    made = cfg.model_copy(deep=True)
    made.train = teacher.config.train.model_copy(deep=True)
    made.train.privacy = PrivacyConfig()
    return made


HOW_DATA_IS_USED = {
    "distill": "the student learns on the training images without DP-SGD",
    "prune": "it is fine-tuned on the training images without DP-SGD",
    "quantize": "its activation ranges are calibrated on training images",
}


def _privacy_note(teacher: Teacher, method: str) -> dict:
    """A result of a private teacher has no epsilon of its own: the training data is used
    again outside DP-SGD. Said in a run tag, which the promotion policy and its report read."""
    epsilon = teacher.tags.get("privacy.epsilon")
    if epsilon is None:
        return {}
    delta, name = teacher.tags.get("privacy.delta"), teacher.model or teacher.run_id
    return {
        "privacy.note": f"made by {method} from a private teacher ({name}, epsilon "
        f"{float(epsilon):.3g} at delta {float(delta):.3g}), but {HOW_DATA_IS_USED[method]}: "
        "no epsilon of its own"
    }


def distill(cfg: Config, settings: Settings, validation: dict, teacher: Teacher, ctx) -> str:
    """Train compress.distill.student on the teacher's softened outputs with train's engine,
    schedule, checkpoints and resume (`pipeline compress --resume`); the run's id."""
    from pipeline.stages.train import train_stage
    from pipeline.training.compression import distillation_loss

    d = cfg.compress.distill
    student = _recipe_config(cfg, teacher)
    student.train.model = d.student
    student.train.epochs = d.epochs or student.train.epochs

    def recipe(dataset) -> dict:
        network, _ = _teacher_network(teacher, dataset)
        smoothing = student.train.label_smoothing
        return {"loss": distillation_loss(network, d.temperature, d.alpha, smoothing)}

    return train_stage(student, settings, validation, ctx, recipe=recipe)["run_id"]


def prune(cfg: Config, settings: Settings, validation: dict, teacher: Teacher, ctx) -> str:
    """Remove channels of the teacher (`compression.prune`), then fine-tune compress.prune.epochs
    from compress.prune.lr_scale x the teacher's lr with a cosine decay, as a training run; the
    run's id."""
    from pipeline.stages.train import train_stage
    from pipeline.training import compression

    p = cfg.compress.prune
    tuned = _recipe_config(cfg, teacher)
    tuned.train.epochs = p.epochs
    tuned.train.optimizer.lr = tuned.train.optimizer.lr * p.lr_scale
    # Fine-tuning starts from trained weights: decay from the scaled lr, no warmup, never the
    # one-cycle rise (which would spend the few epochs at a tiny then a large lr).
    tuned.train.schedule = tuned.train.schedule.model_copy(
        update={"name": "cosine", "warmup_epochs": 0, "min_lr_ratio": 0.0}
    )

    def recipe(dataset) -> dict:
        network, spec = _teacher_network(teacher, dataset)
        return {"start": compression.prune(network, spec, p)}

    return train_stage(tuned, settings, validation, ctx, recipe=recipe)["run_id"]


def quantize(cfg: Config, settings: Settings, validation: dict, teacher: Teacher, ctx) -> str:
    """The teacher as int8 ONNX (`compression.quantize`), calibrated on a seeded sample of
    compress.quantize.calibration_images training images; an MLflow run of its own with the
    teacher's lineage and an empty history; the run's id."""
    import numpy as np

    from pipeline.data import check_validated, read_dataset
    from pipeline.tracking import recorder, weights
    from pipeline.training import compression, runtime

    q = cfg.compress.quantize
    made = _recipe_config(cfg, teacher)
    data = check_validated(cfg.base.dataset, settings.root, settings.data_dir, validation)
    ds = read_dataset(settings.data_dir, mmap=True)
    network, spec = _teacher_network(teacher, ds)
    rng = np.random.default_rng(cfg.base.seed)
    n = min(q.calibration_images, len(ds.train.labels))
    picked = np.sort(rng.choice(len(ds.train.labels), n, replace=False))
    calibration = np.asarray(ds.train.images[picked], dtype=np.float32)
    identity = hashlib.sha256(f"{ctx.scope}:{data['data_md5']}".encode()).hexdigest()[:16]
    with recorder.begin() as tracking:
        tracking.open(recorder.Opening(
            made, made, settings, validation, ctx, ds.name, identity, "cpu (onnxruntime)", 1,
            interrupts.owner(),
        ))  # fmt: skip
        try:
            with tempfile.TemporaryDirectory() as tmp:
                folder, work = Path(tmp) / "run", Path(tmp)
                folder.mkdir()
                float_path = runtime.export(network, spec, work / "float.onnx")
                int8 = compression.quantize(
                    float_path, work / "model.onnx", calibration, q.per_channel
                )
                runtime.stamp(int8, spec, "int8")
                weights.save_onnx(int8, spec, np.asarray(ds.test.images[:2]), folder)
                history = {"history": [], "steps_per_epoch": 0}
                (folder / "history.json").write_text(json.dumps(history))
                run_id = tracking.run_id
                tracking.end("FINISHED", {"compress.calibration_images": str(n)}, folder)
        except BaseException:
            tracking.abort("FAILED")
            raise
    return run_id


def measure(cfg: Config, run_id: str, teacher: Teacher, measured: dict | None = None) -> dict:
    """The compressed model's and the teacher's figures (`efficiency.figures`) and speed
    (`efficiency.speed`), measured in this process (the teacher once per compress call:
    `measured` keeps its figures for the next result), logged to the run as
    metrics (the teacher's prefixed `teacher_`, with its test scores and per-class recall from
    its own run on the same split; for int8 also the float model in ONNX Runtime,
    `float_onnx_`, so the runtime does not take the quantization's credit). Returns them."""
    from mlflow import MlflowClient

    from pipeline.tracking import store, weights
    from pipeline.training import efficiency, runtime

    runs = cfg.compress.latency_runs
    with tempfile.TemporaryDirectory() as tmp:
        mine, theirs = Path(tmp) / "model", Path(tmp) / "teacher"
        mine.mkdir(), theirs.mkdir()
        model, spec = weights.load_weights(run_id, keep=mine)
        figures = efficiency.figures(model, spec, next(mine.rglob("model.*")))
        figures |= efficiency.speed(model, spec.shape, runs)
        measured = {} if measured is None else measured
        onnx = isinstance(model, runtime.OnnxModel)
        if not measured or onnx:  # the teacher is needed once, and for int8's float reference
            big, big_spec = weights.load_weights(teacher.run_id, keep=theirs)
        if not measured:  # once per compress call: every result shows the same teacher figures
            measured |= efficiency.figures(big, big_spec, next(theirs.rglob("model.*")))
            measured |= efficiency.speed(big, big_spec.shape, runs)
        figures |= {f"teacher_{k}": v for k, v in measured.items()}
        if onnx:
            floating = runtime.OnnxModel(runtime.export(big, big_spec, Path(tmp) / "float.onnx"))
            speed = efficiency.speed(floating, big_spec.shape, runs)
            figures |= {f"float_onnx_{k}": v for k, v in speed.items()}
    scored = ("test_accuracy", "test_macro_f1")  # and per-class recall: the teacher's, same split
    figures |= {
        f"teacher_{k}": v
        for k, v in teacher.metrics.items()
        if k in scored or k.startswith("test_recall.")
    }
    store.log_metrics(MlflowClient(), run_id, figures)
    return figures
