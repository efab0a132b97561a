"""Batch prediction with a registered model: a folder of images or an .npy file in, CSV or JSON
with class names and probabilities out, stamped with the exact model version used."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pipeline.config import MonitorConfig
from pipeline.data import DataError
from pipeline.data.inputs import open_inputs
from pipeline.files import write_atomic
from pipeline.settings import Settings


def write(path: Path, names: list[str], probs: np.ndarray, classes: list[str], model: dict):
    """One row per input: name, predicted class, its probability, one column per class, and the
    exact model version. CSV or JSON (rows under `predictions`, the model beside them); rows are
    written as they are made, never all held as dicts."""
    path = Path(path)
    pinned = f"{model['name']}/{model['version']}"

    def rows():
        for name, k, p in zip(names, probs.argmax(1), probs, strict=True):
            yield {
                "input": name,
                "prediction": classes[k],
                "probability": round(float(p[k]), 6),
                **{f"p_{c}": round(float(v), 6) for c, v in zip(classes, p, strict=True)},
                "model": pinned,
            }

    def write_rows(handle) -> None:
        if path.suffix == ".json":
            handle.write(f'{{"model": {json.dumps(model)},\n "predictions": [\n')
            for i, row in enumerate(rows()):
                handle.write(("" if i == 0 else ",\n") + "  " + json.dumps(row))
            handle.write("\n]}\n")
        else:
            header = ["input", "prediction", "probability", *(f"p_{c}" for c in classes), "model"]
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows())

    return write_atomic(path, write_rows)  # a reader never sees half a file


def pin_stage(settings: Settings, ref: str) -> dict:
    """The exact version `ref` (NAME/VERSION, NAME@ALIAS or NAME) is now: {"name", "version",
    "run_id", "weights_sha256"} (the digest is None for a version registered before it was
    recorded); LookupError when it does not resolve."""
    from pipeline.registry import versions
    from pipeline.tracking import server, store

    with server.reachable(settings):
        version = versions.resolve(store.client(settings), ref)
    return {
        "name": version.name,
        "version": int(version.version),
        "run_id": version.run_id,
        "weights_sha256": version.tags.get(versions.WEIGHTS_TAG),
    }


def predict_stage(
    settings: Settings, ref: str, inputs: Path, output: Path, monitor: MonitorConfig | None = None
) -> dict:
    """Resolve `ref` once (pinning the version), score `inputs` (a folder of images or an .npy
    of N x C x H x W) a batch at a time through the model's input contract, write `output`
    (.csv or .json); with `monitor`, the prediction log records the scored images once the
    output is written (`pipeline.monitoring`; a store that refuses them is reported in the
    result, not raised). Files in a folder that are no images are listed under `skipped`
    in the result. Raises DataError for unreadable inputs or another output suffix."""
    from pipeline.monitoring import log
    from pipeline.tracking import server, weights
    from pipeline.training.calibration import softmax
    from pipeline.training.inference import logits_and_features

    if Path(output).suffix not in (".csv", ".json"):
        raise DataError(f"{output}: the output must end in .csv or .json")
    try:  # before any scoring: a folder that cannot be had fails now, in one line
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"{output}: cannot make its folder ({exc.strerror}); give an output in a folder"
        ) from None
    pinned = pin_stage(settings, ref)
    with server.reachable(settings):
        model, spec = weights.load_weights(pinned["run_id"], sha256=pinned["weights_sha256"])
        temperature = weights.temperature(pinned["run_id"])  # calibrated probabilities
    found = open_inputs(inputs, spec.input_contract())  # the model's own preprocessing
    classes = list(spec.classes)
    keep_log = monitor is not None and monitor.log
    store = log.open_store(settings, monitor) if keep_log else None  # a bad one: before scoring
    scored, logged, start, rng = [], [], 0, np.random.default_rng()
    model_id = (pinned["name"], pinned["version"])
    for batch in found.batches():
        pixels = np.asarray(batch, np.float32)  # once, for the model and the log's profile
        logits, features = logits_and_features(model, pixels)
        probs = softmax(logits, temperature)
        names, start = found.names[start : start + len(batch)], start + len(batch)
        if keep_log:
            answers = [classes[k] for k in probs.argmax(1)]
            images = log.Scored(pixels, features, probs, answers, None, names)
            logged.append(log.sample(rng, monitor.sample_rate, "predict", model_id, images))
        scored.append(probs)
    write(output, found.names, np.concatenate(scored), classes, pinned)
    out = {"model": pinned, "inputs": len(found.names), "output": str(output)}
    if keep_log:  # only once the output exists: a failed run, retried, logs its images once
        out |= _log(store, [item for item in logged if item is not None])
    return {**out, "skipped": found.skipped} if found.skipped else out


def _log(store, items: list[tuple]) -> dict:
    """Write the prediction log's rows of `items`: {"logged": rows}, or {"not_logged": rows,
    "log_failure": why} when the store refuses them (the predictions stand)."""
    from pipeline.monitoring.log import table_of

    table = table_of(items)
    try:
        store.write(table)
    except Exception as exc:  # noqa: BLE001  (the log never fails a prediction)
        return {"not_logged": table.num_rows, "log_failure": f"{type(exc).__name__}: {exc}"}
    return {"logged": table.num_rows}
