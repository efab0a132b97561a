"""Request bodies of MLflow's scoring protocol, read within limits: the JSON formats
(`inputs`, `instances`, `dataframe_split`, `dataframe_records`) and CSV, as `mlflow models
serve` takes them (its own parsers turn them into the model input, so clients see the same
results), then decoded through the model's input contract (`tracking.served.pixels`).

Every refusal is a `Refused` with the HTTP status, a short reason (a metrics label) and one
line that names the problem; none echoes the request."""

from __future__ import annotations

import io
import json

import numpy as np

FORMATS = ("inputs", "instances", "dataframe_split", "dataframe_records")
SHOWN = 200  # characters of a parser's message that an answer repeats


class Refused(Exception):
    """A request the server will not score: `status` (4xx), `reason` (a metrics label)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


def model_input(body: bytes, content_type: str | None):
    """What MLflow's scoring server would hand the model for this body: a DataFrame, an array
    or a list. Raises Refused (415 for another content type, 400 for a body that does not parse
    or names no format)."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import infer_and_parse_data, parse_csv_input

    mime = (content_type or "").split(";")[0].strip().lower()
    try:
        if mime == "text/csv":
            return parse_csv_input(io.StringIO(body.decode("utf-8")))
        if mime != "application/json":
            raise Refused(
                415, "content_type", f"send application/json or text/csv, not {mime or 'nothing'}"
            )
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting past Python's stack
            detail = "nested too deeply" if isinstance(exc, RecursionError) else _short(exc)
            raise Refused(400, "bad_json", f"the body is not JSON we read: {detail}") from None
        keys = sorted(parsed) if isinstance(parsed, dict) else []
        if len(set(keys) & set(FORMATS)) != 1:
            raise Refused(
                400,
                "bad_format",
                f"the JSON body must be an object with one of {', '.join(FORMATS)}; "
                f"it has {', '.join(keys[:5]) or 'none'}",
            )
        return infer_and_parse_data({k: v for k, v in parsed.items() if k in FORMATS})
    except UnicodeDecodeError:
        raise Refused(400, "bad_encoding", "the body is not UTF-8") from None
    except (MlflowException, ValueError, TypeError) as exc:
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        raise Refused(400, "bad_format", _short(message)) from None


def count(data) -> int:
    """How many images a parsed body holds, before any is decoded: rows x columns of a
    DataFrame of files, else the length of the outer list (N x C x H x W pixels)."""
    if hasattr(data, "to_numpy"):
        values = data.to_numpy()
        return values.size if values.dtype == object else len(values)
    if isinstance(data, bytes | str):
        return 1
    if isinstance(data, np.ndarray) and data.dtype.kind in "OSU":
        return data.size
    return len(data) if hasattr(data, "__len__") else 1


def _short(exc) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."
