"""The MLflow model: a pyfunc that `mlflow models serve`, `mlflow models predict` and
`mlflow.pyfunc.load_model` run with the same input contract and calibration as `pipeline
predict`.

Logged with this module as its `loader_module`: MLflow imports it from the installed package and
calls `_load_pyfunc` with the model's data folder, which holds only data: the weights-only
`model.pt` (state dict + spec, the contract inside; or `model.onnx`), `contract.json`, the same
contract for people and tools, and `calibration.json` (evaluate's temperature) when the run has
one. No code travels in the artifact store (models logged before this bundled the package and a
code file, which the server ran).

Inputs (MLflow's `{"inputs": ...}` JSON, or Python objects):
- image files, base64 strings (JSON) or bytes: decoded as at ingest (EXIF, transparency, bit
  depth, resize policy), under the serving pixel limit (`InputContract.serve_pixels`);
- arrays, N x C x H x W (N x H x W for one channel): uint8, or numbers on the 0..255 scale.
0..1-scaled arrays, NaN/Inf and wrong shapes are refused with `pipeline predict`'s messages (HTTP
400 when served). Output: one row per input, `prediction` (the class name), `probability`, and
`p_<class>` for every class.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.data.contract import float_batches

SUBJECT = "the input"  # how messages name what was sent (pipeline predict names the file)
BATCH = 256
WEIGHT_FILES = ("model.pt", "model.onnx")


def _load_pyfunc(data_path: str) -> ImageClassifier:
    """MLflow's hook for a `loader_module`: the model in `data_path`, the folder logged as the
    model's data (one weights file of `WEIGHT_FILES`, and `contract.json`)."""
    found = [Path(data_path) / name for name in WEIGHT_FILES if (Path(data_path) / name).exists()]
    if len(found) != 1:
        raise FileNotFoundError(f"{data_path} holds no single weights file {WEIGHT_FILES}")
    return ImageClassifier(found[0])


class ImageClassifier:
    """A registered model as MLflow's pyfunc wrapper calls it: `predict(model_input)`. Its
    probabilities are calibrated by the temperature in the data folder's `calibration.json`
    (none: the plain softmax, as a model exported before calibration)."""

    def __init__(self, weights: Path):
        import json

        from pipeline.tracking.weights import CALIBRATION, read_weights
        from pipeline.training.calibration import read_temperature

        self.model, spec = read_weights(weights)
        self.contract = spec.input_contract()
        calibration = weights.parent / CALIBRATION
        self.temperature = (
            read_temperature(json.loads(calibration.read_text())) if calibration.exists() else 1.0
        )

    def predict(self, model_input, params=None):
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from pipeline.training.inference import probabilities

        try:
            probs = [
                probabilities(self.model, b, self.temperature)
                for b in pixels(model_input, self.contract)
            ]
        except ValueError as exc:  # the contract's refusals: HTTP 400, the message as it is
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(rows(np.concatenate(probs), self.contract.classes))


def rows(probs: np.ndarray, classes) -> dict[str, list]:
    """Columns of the output: prediction, probability, p_<class>... (N rows)."""
    top = probs.argmax(1)
    return {
        "prediction": [classes[k] for k in top],
        "probability": probs[np.arange(len(probs)), top].astype(float).tolist(),
        **{f"p_{c}": probs[:, k].astype(float).tolist() for k, c in enumerate(classes)},
    }


def pixels(model_input, contract) -> Iterator[np.ndarray]:
    """float32 N x C x H x W batches of what was sent: encoded files or an array of pixels.
    Raises ValueError naming the problem."""
    values = model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input
    if isinstance(values, bytes | str):
        values = [values]
    if isinstance(values, list) and values and all(isinstance(v, bytes | str) for v in values):
        values = np.array(values, dtype=object)  # not "S": numpy would strip trailing NULs
    values = np.asarray(values)
    if values.size == 0:
        raise ValueError(f"{SUBJECT} holds no images (shape {list(values.shape)})")
    flat = values.reshape(-1) if values.dtype == object or values.dtype.kind in "SU" else None
    if flat is not None and all(isinstance(v, bytes | str) for v in flat):
        yield from _files(flat, contract)
        return
    if values.dtype == object:  # JSON numbers: numpy infers their type (bools stay bools)
        try:
            values = np.array(values.tolist())
        except ValueError:
            raise ValueError(
                f"{SUBJECT} is ragged: its images are not all of one shape N x C x H x W"
            ) from None
    if values.dtype == object or values.dtype.kind in "SU":
        raise ValueError(
            f"{SUBJECT} holds values that are neither numbers nor encoded image files "
            "(give N x C x H x W pixels, or base64 strings of image files)"
        )
    yield from float_batches(contract.check(values, SUBJECT), BATCH)


def _files(encoded: np.ndarray, contract) -> Iterator[np.ndarray]:
    from pipeline.data.images import BadImage

    for start in range(0, len(encoded), BATCH):
        batch = []
        for i, item in enumerate(encoded[start : start + BATCH], start=start):
            try:
                raw = base64.b64decode(item, validate=True) if isinstance(item, str) else item
                batch.append(contract.decode(raw, served=True))
            except (binascii.Error, ValueError) as exc:
                reason = "not base64" if isinstance(exc, binascii.Error) else str(exc)
                raise ValueError(f"{SUBJECT}'s image {i}: {reason}") from None
            except BadImage as exc:
                raise ValueError(f"{SUBJECT}'s image {i}: {exc}") from None
        yield np.stack(batch).astype(np.float32)
