"""evaluate: score a run's model on the test split; rescore a model on the current data."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

from pipeline.config import Config
from pipeline.data import Dataset, check_data, read_dataset
from pipeline.files import write_json
from pipeline.settings import Settings


def evaluate_stage(cfg: Config, settings: Settings, run_id: str, handoff: bool = True) -> dict:
    """Score the run's model on the test split; metrics + plots to MLflow and (`handoff`: the
    CLI, dvc.yaml and the training DAG) to outputs/. Sweep trials, which may run at once in one
    checkout, pass handoff=False: their plots go through a folder of their own."""
    import tempfile

    import mlflow

    from pipeline.tracking import store, weights
    from pipeline.training import inference, plots, scoring

    data = check_data(cfg.base.dataset, settings.root, settings.data_dir)
    ds = read_dataset(settings.data_dir, mmap=True)
    store.configure(settings, cfg.tracking.experiment)
    store.active_run(mlflow.MlflowClient(), run_id)  # a run deleted in the UI: say so, once
    model, _ = weights.load_weights(run_id)
    preds = inference.predict(model, ds.test.images)
    scores = scoring.metrics(ds.test.labels, preds, ds.classes)
    cm = scoring.confusion(ds.test.labels, preds, len(ds.classes))
    history = mlflow.artifacts.load_dict(f"runs:/{run_id}/history.json")["history"]
    own = None if handoff else tempfile.TemporaryDirectory(prefix="plots-")
    plot_dir = settings.outputs / "plots" if handoff else Path(own.name)
    plot_dir.mkdir(parents=True, exist_ok=True)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(scores)
        mlflow.log_artifact(
            str(plots.plot_confusion(cm, ds.classes, plot_dir / "confusion_matrix.png")), "plots"
        )
        mlflow.log_artifact(
            str(plots.plot_learning_curves(history, plot_dir / "learning_curves.png")), "plots"
        )
    summary = {
        "test_accuracy": scores["test_accuracy"],
        "test_macro_f1": scores["test_macro_f1"],
        "data_md5": data["data_md5"],
    }
    if own is not None:
        own.cleanup()
    if handoff:
        write_json(settings.outputs / "metrics.json", {**scores, "data_md5": data["data_md5"]})
    return {"run_id": run_id, **summary}


def current_data(cfg: Config, settings: Settings) -> Callable[[], tuple[str, Dataset]]:
    """(data md5, dataset) of data/, checked against data.dvc on the first call only: a promotion
    scores two models on it, or none."""

    @cache
    def load() -> tuple[str, Dataset]:
        md5 = check_data(cfg.base.dataset, settings.root, settings.data_dir)["data_md5"]
        return md5, read_dataset(settings.data_dir, mmap=True)

    return load


def rescore(run_id: str, ds: Dataset) -> tuple[dict, str]:
    """A model's metrics on `ds`'s test split (a fair comparison even when the data changed), or
    ({}, how it differs) when it was built for other image shapes or classes."""
    from pipeline.tracking import weights
    from pipeline.training import inference, scoring

    model, spec = weights.load_weights(run_id)
    mismatch = _mismatch(spec, ds)
    if mismatch:
        return {}, mismatch
    scores = scoring.metrics(ds.test.labels, inference.predict(model, ds.test.images), ds.classes)
    return scores, ""


def _mismatch(spec, ds) -> str:
    """How a model's inputs and classes differ from the dataset's; '' when they match."""

    def classes(names: list[str]) -> str:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        return f"{len(names)} classes [{shown}]"

    def shape(dims) -> str:
        return "x".join(str(d) for d in dims)

    parts = []
    if list(spec.classes) != list(ds.classes):
        parts.append(f"model: {classes(list(spec.classes))}, data: {classes(ds.classes)}")
    if list(spec.shape) != list(ds.shape):
        parts.append(f"model input {shape(spec.shape)}, data {shape(ds.shape)}")
    return "; ".join(parts)
