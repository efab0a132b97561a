"""Batch prediction with a registered model: a folder of images or an .npy file in, CSV or JSON
with class names and probabilities out, stamped with the exact model version used."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pipeline.data import DataError
from pipeline.data.inputs import load_inputs
from pipeline.files import write_atomic


def write(path: Path, names: list[str], probs: np.ndarray, classes: list[str], model: dict):
    """One row per input: name, predicted class, its probability, one column per class, and the
    exact model version. CSV or JSON (rows under `predictions`, the model beside them)."""
    path = Path(path)
    pinned = f"{model['name']}/{model['version']}"
    rows = [
        {
            "input": name,
            "prediction": classes[k],
            "probability": round(float(p[k]), 6),
            **{f"p_{c}": round(float(v), 6) for c, v in zip(classes, p, strict=True)},
            "model": pinned,
        }
        for name, k, p in zip(names, probs.argmax(1), probs, strict=True)
    ]

    def write_rows(handle) -> None:
        if path.suffix == ".json":
            handle.write(json.dumps({"model": model, "predictions": rows}, indent=2) + "\n")
        else:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    return write_atomic(path, write_rows)  # a reader never sees half a file


def predict_stage(client, ref: str, inputs: Path, output: Path) -> dict:
    """Resolve `ref` once (pinning the version), score `inputs`, write `output`."""
    from pipeline.registry import versions
    from pipeline.tracking import weights

    if Path(output).suffix not in (".csv", ".json"):
        raise DataError(f"{output}: the output must end in .csv or .json")
    version = versions.resolve(client, ref)
    model, spec = weights.load_weights(version.run_id)
    names, images = load_inputs(inputs, spec.shape)
    pinned = {"name": version.name, "version": int(version.version), "run_id": version.run_id}
    from pipeline.training.inference import probabilities

    write(output, names, probabilities(model, images), list(spec.classes), pinned)
    return {"model": pinned, "inputs": len(names), "output": str(output)}
