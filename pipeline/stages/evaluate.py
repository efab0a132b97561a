"""evaluate: score a run's model on the test split of the data it was trained on."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.context import RunContext
from pipeline.data import DataError, Dataset, check_data, read_dataset
from pipeline.monitoring.reference import ARTIFACT as REFERENCE
from pipeline.settings import Settings


def run(cfg: Config, settings: Settings, inputs: dict, ctx: RunContext) -> dict:
    """The graph's evaluate stage: the train stage's run, its plots to outputs/plots/ and
    their data to reports/plots/ (dvc.yaml's plots, kept in git per revision)."""
    return evaluate_stage(
        cfg, settings, inputs["train"]["run_id"], settings.outputs / "plots", settings.series
    )


def evaluate_stage(
    cfg: Config,
    settings: Settings,
    run_id: str,
    plot_dir: Path | None = None,
    series_dir: Path | None = None,
) -> dict:
    """Score the run's model on the test split: {"run_id", "test_accuracy", "test_macro_f1",
    "test_precision.<key>", "test_recall.<key>", "data_md5"} (fractions 0..1, keys of the
    classes by `scoring.class_key`; with
    "privacy.epsilon" for a DP-SGD run), the scores also logged
    to the run with the confusion matrix, the learning curves and the lr schedule. The plots
    are written to `plot_dir`, or a folder of their own (sweep trials may run at once in one
    checkout); `series_dir` gets the data behind them as CSV (see `write_series`).
    Raises DataError when data/ differs from data.dvc or from the run's data version (other
    classes or shapes included), LookupError for a deleted run."""
    # DVC's comparison of data/ with data.dvc runs in a child process while torch and MLflow load.
    data = check_data(cfg.base.dataset, settings.root, settings.data_dir, wait=False)
    import mlflow
    import pyarrow.parquet

    from pipeline.tracking import store, weights
    from pipeline.training import inference, scoring

    data["wait"]()  # never score on data/ that differs from data.dvc
    ds = read_dataset(settings.data_dir, mmap=True)
    store.configure(settings, cfg.tracking.experiment)
    run = store.active_run(mlflow.MlflowClient(), run_id)  # deleted in the UI: say so, once
    model, spec = weights.load_weights(run_id)
    _own_data(run, spec, ds, data["data_md5"])  # before anything is logged into the run
    test_logits = inference.logits(model, ds.test.images)
    preds = test_logits.argmax(1)
    scores = scoring.metrics(ds.test.labels, preds, ds.classes)
    cm = scoring.confusion(ds.test.labels, preds, len(ds.classes))
    logged = mlflow.artifacts.load_dict(f"runs:/{run_id}/history.json")
    trained = mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json")  # lr: auto resolved
    held = _held_out(model, ds, trained, private="privacy.epsilon" in run.data.params)
    calibrated = _calibrate(held, test_logits, ds.test.labels)
    temperature = calibrated["temperature"]
    held_scores, abstention = _conformal(held, temperature, test_logits, ds.test.labels, cfg.serve)
    scores |= {
        "test_prob_ece": calibrated["before"]["ece"],
        "test_prob_ece_calibrated": calibrated["after"]["ece"],
        "val_temperature": temperature,
        **abstention,
    }
    # Logged into the finished run without reopening it: a killed evaluate never leaves the
    # training run RUNNING (or FAILED).
    client = mlflow.MlflowClient()
    with _folder(plot_dir) as folder:
        store.log_metrics(client, run_id, scores)
        client.log_dict(run_id, calibrated, weights.CALIBRATION)
        client.set_tag(run_id, "calibration.fitted_on", calibrated["fitted_on"])
        if held_scores is not None:
            with tempfile.TemporaryDirectory() as tmp:
                np.savez(Path(tmp) / weights.CONFORMAL, **held_scores)
                client.log_artifact(run_id, str(Path(tmp) / weights.CONFORMAL))
        for path in _plots(cm, ds.classes, logged, trained, folder, calibrated):
            client.log_artifact(run_id, str(path), "plots")
        made = _reference(model, ds, trained, held, temperature, cfg.register_.model_name)
        with tempfile.TemporaryDirectory() as tmp:  # monitor/reference.parquet
            path = Path(tmp, Path(REFERENCE).name)
            pyarrow.parquet.write_table(made, path)
            client.log_artifact(run_id, str(path), str(Path(REFERENCE).parent))
    if series_dir is not None:
        write_series(series_dir, logged["history"], scores, ds.classes, ds.test.labels, preds)
    # DP-SGD's epsilon beside the scores, so that `dvc exp show` compares the two
    private = {k: float(v) for k, v in run.data.params.items() if k == "privacy.epsilon"}
    return {"run_id": run_id, **scores, **private, "data_md5": data["data_md5"]}


def _own_data(run, spec, ds: Dataset, md5: str) -> None:
    """A run's test scores come from the test split of the data it was trained on: DataError
    when data/ holds another version (or other classes or image shapes) than the run's."""
    trained_on = run.data.tags.get("data.md5")
    mismatch = spec.mismatch(ds)
    if (trained_on and trained_on != md5) or mismatch:
        differs = mismatch or f"trained on data version {trained_on}, data/ holds {md5}"
        commit = run.data.tags.get("git.commit", "<its commit>")
        raise DataError(
            f"run {run.info.run_id} cannot be evaluated on data/ ({differs}): its scores come "
            f"from its own data version; check that out (`git checkout {commit} -- data.dvc && "
            "dvc checkout data.dvc`), or train on this one"
        )


def write_series(folder: Path, history: list[dict], scores: dict, classes, labels, preds) -> None:
    """The plots' data as CSV, which `dvc plots show/diff` draws and overlays across revisions
    (dvc.yaml's top-level `plots`): learning_curves.csv (epoch, losses, val_accuracy, lr),
    per_class.csv (class, precision, recall) and predictions.csv (actual, predicted class
    names, one row per test image: DVC's confusion template counts them). Timing columns stay
    out: they differ on every run and would make every revision differ."""
    import csv

    from pipeline.files import write_atomic
    from pipeline.training.scoring import class_keys

    curves = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr")
    columns = [c for c in curves if c in history[0]]
    tables = {
        "learning_curves.csv": [columns, *([row[c] for c in columns] for row in history)],
        "per_class.csv": [
            ["class", "precision", "recall"],
            *(
                [c, scores[f"test_precision.{k}"], scores[f"test_recall.{k}"]]
                for k, c in class_keys(classes).items()
            ),
        ],
        "predictions.csv": [
            ["actual", "predicted"],
            *([classes[a], classes[p]] for a, p in zip(labels, preds, strict=True)),
        ],
    }
    for name, rows in tables.items():
        write_atomic(folder / name, lambda handle, rows=rows: csv.writer(handle).writerows(rows))


@contextmanager
def _folder(path: Path | None):
    """`path` (created), or a temporary folder removed afterwards, also on an error."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="plots-") as own:
        yield Path(own)


def _held_out(model, ds: Dataset, trained: dict, private: bool):
    """The run's own validation split (the rows its training held out: `train.val_fraction` and
    `base.seed` of the run's config) as (logits, labels), or why there is none to use: the run
    held nothing out, or trained under DP-SGD (the images would be used outside the privacy
    guarantee)."""
    from pipeline.training import inference
    from pipeline.training.batches import split_validation

    if private:
        return "DP-SGD run"
    if not trained["train"]["val_fraction"]:
        return "no validation split (train.val_fraction 0)"
    _, val = split_validation(ds.train, trained["train"]["val_fraction"], trained["base"]["seed"])
    logits = np.concatenate([inference.logits(model, images) for images, _ in val.chunks()])
    return logits, val.labels


def _reference(model, ds: Dataset, trained: dict, held, temperature: float, name: str):
    """The prediction-log rows monitoring compares the version's live rows with (a pyarrow
    Table): the test split's and, where `_held_out` found one to use, the validation split's
    (`monitoring.reference`)."""
    from pipeline.data.store import chunks
    from pipeline.monitoring import reference
    from pipeline.training.batches import split_validation

    splits = {"test": (rows for _, rows in chunks(ds.test.images, 256))}
    if not isinstance(held, str):
        fraction, seed = trained["train"]["val_fraction"], trained["base"]["seed"]
        _, val = split_validation(ds.train, fraction, seed)
        splits["validation"] = (images for images, _ in val.chunks(256))
    return reference.reference(model, splits, temperature, list(ds.classes), name)


def _calibrate(held, test_logits: np.ndarray, test_labels: np.ndarray) -> dict:
    """calibration.json: the temperature fitted on the held-out split (`_held_out`) and the test
    split's reliability before and after it (`training.calibration`). Not fitted (T = 1,
    `fitted_on` says why) without a held-out split, or when it does not determine T (no
    mistakes in it, typically)."""
    from pipeline.training import calibration

    before = calibration.reliability(calibration.softmax(test_logits), test_labels)
    record = {"temperature": 1.0, "bins": calibration.BINS, "before": before, "after": before}
    if isinstance(held, str):
        return record | {"fitted_on": f"not fitted: {held}"}
    logits, labels = held
    temperature = calibration.fit_temperature(logits, labels)
    if temperature is None:
        mistakes = int((logits.argmax(1) != labels).sum())
        return record | {
            "fitted_on": f"not fitted: the validation split ({len(labels)} images, {mistakes} "
            "mistakes) does not determine a temperature (its likelihood keeps rising toward a "
            "bound of the search); more held-out images would"
        }
    after = calibration.softmax(test_logits, temperature)
    return record | {
        "temperature": temperature,
        "fitted_on": f"the validation split ({len(labels)} images)",
        "after": calibration.reliability(after, test_labels),
    }


def _conformal(held, temperature: float, test_logits, test_labels, serve) -> tuple:
    """(the held-out scores a server abstains by, for conformal.npz, or None without a held-out
    split; the test split's `test_set_coverage` of the prediction sets and
    `test_unknown_rate` at
    `serve.alpha` and `serve.ood_rate`, or {} when the split is too small for that alpha)."""
    from pipeline.training import calibration, conformal

    if isinstance(held, str):
        return None, {}
    scores = conformal.held_out_scores(*held, temperature)
    try:
        abstainer = conformal.Abstainer(scores, serve.alpha, serve.ood_rate)
    except ValueError:
        return scores, {}
    probs = calibration.softmax(test_logits, temperature)
    sets, reasons = abstainer.decide(test_logits, probs, temperature)
    return scores, {
        "test_set_coverage": float(sets[np.arange(len(test_labels)), test_labels].mean()),
        "test_unknown_rate": float(np.mean([r is not None for r in reasons])),
    }


def _plots(
    cm, classes: list[str], logged: dict, trained: dict, folder: Path, calibrated: dict
) -> list[Path]:
    """The confusion matrix, the reliability diagram, the learning curves and the lr of every
    step (`plot_schedule`: so schedules compare by eye in MLflow); drawn here, where matplotlib
    is loaded anyway, rather than adding it to training's fixed cost."""
    from pipeline.config import resolved_config
    from pipeline.training import plots
    from pipeline.training.schedules import lr_factor

    paths = [plots.plot_confusion(cm, classes, folder / "confusion_matrix.png")]
    paths.append(plots.plot_reliability(calibrated, folder / "reliability.png"))
    if logged["history"]:  # none for a model made without training (compress: quantize)
        paths.append(plots.plot_learning_curves(logged["history"], folder / "learning_curves.png"))
    spe, t = logged.get("steps_per_epoch"), resolved_config(trained).train
    if spe:  # runs trained before it was recorded have none
        lrs = [
            t.optimizer.lr * lr_factor(s, spe, t.epochs, t.schedule) for s in range(spe * t.epochs)
        ]
        paths.append(plots.plot_schedule(lrs, spe, folder / "lr_schedule.png"))
    return paths
