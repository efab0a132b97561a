"""Request bodies of MLflow's scoring protocol, read within limits: the JSON formats
(`inputs`, `instances`, `dataframe_split`, `dataframe_records`) and CSV, as `mlflow models
serve` takes them (its own parsers turn them into the model input, so clients see the same
results), then decoded through the model's input contract (`tracking.served.pixels`).

Every refusal is a `Refused` with the HTTP status, a short reason (a metrics label) and one
line that names the problem: control characters escaped, at most `SHOWN` characters of what a
parser said, and no key or value of the request."""

from __future__ import annotations

import io
import json

import numpy as np

FORMATS = ("inputs", "instances", "dataframe_split", "dataframe_records")
SHOWN = 160  # characters of a parser's message that an answer repeats
LONGEST_NAME = 100  # a CSV column name longer than this is an image, not a header


class Refused(Exception):
    """A request the server will not score: `status` (4xx), `reason` (a metrics label), and a
    message made one bounded line."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(one_line(message))
        self.status, self.reason = status, reason


def one_line(text: str, limit: int = 400) -> str:
    """`text` on one line (control characters as escapes), at most `limit` characters."""
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


def check_headers(content_type: str | None, content_encoding: str | None) -> str:
    """The body's media type (`application/json` or `text/csv`), as MLflow's server accepts
    them: charset UTF-8 only, no compression. Raises Refused (415) for anything else, naming
    the header, never repeating it."""
    mime, *parameters = (part.strip() for part in (content_type or "").split(";"))
    if mime.lower() not in ("application/json", "text/csv"):
        raise Refused(415, "content_type", "send Content-Type application/json or text/csv")
    for parameter in parameters:
        key, _, value = (part.strip().strip('"').lower() for part in parameter.partition("="))
        if key != "charset" or value not in ("utf-8", "utf8"):
            raise Refused(
                415, "content_type", "the only Content-Type parameter taken is charset=utf-8"
            )
    if (content_encoding or "identity").strip().lower() != "identity":
        raise Refused(415, "content_encoding", "send the body uncompressed (no Content-Encoding)")
    return mime.lower()


def model_input(body: bytes, mime: str, max_values: int):
    """What MLflow's scoring server would hand the model for this body (`mime` from
    `check_headers`): a DataFrame, an array or a list. A body with more than `max_values`
    values (counted by its commas before it is parsed, so millions of numbers or of CSV columns
    cost no memory or time) is refused with 413. Raises Refused: 400 for a body that does not
    parse or names no format."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import infer_and_parse_data, parse_csv_input

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(400, "bad_encoding", f"the body is not UTF-8 (byte {exc.start})") from None
    if body.count(b",") >= max_values:
        raise Refused(
            413,
            "too_many_values",
            f"the body holds more than {max_values:,} values, more than serve.max_images "
            "images of this model's size: split it",
        )
    try:
        if mime == "text/csv":
            return _csv(parse_csv_input(io.StringIO(text)))
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting past Python's stack
            detail = "nested too deeply" if isinstance(exc, RecursionError) else _short(exc)
            raise Refused(400, "bad_json", f"the body is not JSON we read: {detail}") from None
        named = [k for k in FORMATS if isinstance(parsed, dict) and k in parsed]
        if len(named) != 1:
            held = f"an object of {len(parsed)} keys" if isinstance(parsed, dict) else "no object"
            raise Refused(
                400,
                "bad_format",
                f"the JSON body must be an object with exactly one of {', '.join(FORMATS)}; "
                f"it is {held}, {len(named)} of them",
            )
        return infer_and_parse_data({named[0]: parsed[named[0]]})
    except RecursionError:
        raise Refused(400, "bad_json", "the body is not JSON we read: nested too deeply") from None
    except (MlflowException, ValueError, TypeError) as exc:
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        if "maximum recursion depth" in message:  # MLflow's parser met nesting Python's did not
            raise Refused(
                400, "bad_json", "the body is not JSON we read: nested too deeply"
            ) from None
        raise Refused(400, "bad_format", _short(message)) from None


def _csv(frame):
    """A frame whose one column's name is an image was sent without a header line: pandas (and
    MLflow) read the first image as the column's name, so say so instead of dropping it."""
    if any(len(str(name)) > LONGEST_NAME for name in frame.columns):
        raise Refused(
            400,
            "bad_format",
            "the CSV's first line is read as its header, and it looks like an image: add a "
            "header line (e.g. `image`) before the images",
        )
    return frame


def count(data) -> int:
    """How many images a parsed body holds, before any is decoded: rows x columns of a
    DataFrame of files, else the length of the outer list (N x C x H x W pixels); 1 for a
    single value."""
    if hasattr(data, "to_numpy"):
        values = data.to_numpy()
        return values.size if values.dtype == object else len(values)
    if isinstance(data, np.ndarray):
        return 1 if data.ndim == 0 else data.size if data.dtype.kind in "OSU" else len(data)
    return len(data) if isinstance(data, list | tuple) else 1


def _short(exc) -> str:
    return one_line(" ".join(str(exc).split()), SHOWN)
