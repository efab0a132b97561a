"""Reaching MLflow: a server that does not answer is said at once, retried within bounds, then
turned into one clear `RegistryUnavailable`."""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from datetime import datetime

from pipeline.errors import HOST_REFUSED, PermanentError, RegistryUnavailable, mlflow_refusal
from pipeline.settings import Settings


def wait_for_server(settings: Settings, log=lambda text: print(text, file=sys.stderr)) -> None:
    """For interactive commands: an MLflow server that does not answer is said at once, retried
    until `settings.mlflow_wait_s`, then a clear error; a local store needs no wait.

    MLflow's own HTTP retries (about 4 minutes per request by default) are bounded too, unless
    MLFLOW_HTTP_REQUEST_* is set, so a server lost mid-command also fails within a minute."""
    uri = settings.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return
    for key, value in INTERACTIVE_HTTP.items():
        os.environ.setdefault(key, value)
    deadline, delay = time.monotonic() + settings.mlflow_wait_s, 1.0
    while (problem := _unreachable(uri)) is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RegistryUnavailable(
                f"MLflow at {uri} did not answer for {settings.mlflow_wait_s:g} s ({problem}); "
                "nothing was changed. Start it (or fix MLFLOW_TRACKING_URI) and run again"
            )
        if delay == 1.0:
            until = datetime.fromtimestamp(time.time() + left).strftime("%H:%M:%S")
            log(
                f"MLflow at {uri} not reachable ({problem}), retrying until {until} "
                "(PIPELINE_MLFLOW_WAIT_S sets how long)"
            )
        time.sleep(min(delay, left))
        delay = min(delay * 2, 10.0)


# MLflow client retries for interactive commands: 3 tries with 2/4 s backoff, 20 s per request.
INTERACTIVE_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def _unreachable(uri: str) -> str | None:
    """None when the server answers at all (any HTTP status), else why not. Asks an API path,
    not /health: MLflow exempts /health from its Host-header check, so a server that refuses
    this client's Host header looks healthy there (`host_refused`)."""
    try:
        urllib.request.urlopen(
            f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1", timeout=5
        ).close()
    except urllib.error.HTTPError as exc:
        body = exc.read(200).decode(errors="replace")
        if exc.code == 403 and HOST_REFUSED in body:
            raise PermanentError(mlflow_refusal(RuntimeError(body), uri)) from None
        return None
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
    return None


def connection_failure(exc: BaseException) -> bool:
    """Whether an MLflow client error means the server could not be reached."""
    import requests

    if isinstance(exc, requests.exceptions.RequestException):
        return True
    text = str(exc)
    return any(
        s in text for s in ("Max retries exceeded", "Connection refused", "Failed to establish")
    )


@contextmanager
def reachable(settings: Settings):
    """Turn MLflow's connection failures (after its own retries with backoff, see
    MLFLOW_HTTP_REQUEST_MAX_RETRIES) into one clear error."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, requests.exceptions.RequestException) as exc:
        text = str(exc)
        refused = mlflow_refusal(exc, settings.tracking_uri)
        if refused:  # a login or host name will not fix itself: no retry
            raise PermanentError(refused) from None
        if not connection_failure(exc):
            raise
        raise RegistryUnavailable(
            f"MLflow at {settings.tracking_uri} is unreachable ({text.splitlines()[0][:200]}); "
            "the step stopped where the server was lost. Start it (or fix MLFLOW_TRACKING_URI) "
            "and run the step again: the retry finds what this one did (a version it created, "
            "an alias it moved) and finishes it, history entry included."
        ) from None
