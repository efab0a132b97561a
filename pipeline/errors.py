"""What can go wrong, by whether a retry can fix it.

`PermanentError` and its kinds will not fix themselves: the CLI reports them in one line and the
DAG tasks fail at once, without retries. `RegistryUnavailable` is transient: retried with backoff.
"""

from __future__ import annotations

import os


def chain(exc: BaseException | None):
    """`exc`, then the exceptions it was raised from or during, innermost last."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


HOST_REFUSED = "Invalid Host header"  # MLflow 3's answer to a Host it was not told to allow


def mlflow_refusal(exc: BaseException, tracking_uri: str) -> str | None:
    """What to do when an MLflow client error anywhere in `exc`'s chain is the server refusing
    the login (401), the action (403) or this client's Host header (403, MLflow's guard against
    DNS rebinding: `--allowed-hosts`); None for other errors. None of them fixes itself, so
    callers fail at once. The client sends MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD."""
    from urllib.parse import urlsplit

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    for text in map(str, chain(exc)):
        if HOST_REFUSED in text:
            host = urlsplit(tracking_uri).netloc.rpartition("@")[2]
            return (
                f"MLflow at {tracking_uri} refused the Host header {host!r} (403 {HOST_REFUSED}:"
                " by default it answers only localhost and private IPs); start the server with "
                f"--allowed-hosts {host} (or MLFLOW_SERVER_ALLOWED_HOSTS), infra/README.md"
            )
        if "error code 401" in text or "You are not authenticated" in text:
            given = f"the login of {user!r} was refused" if user else "no login was given"
            return (
                f"MLflow at {tracking_uri} needs a login (401: {given}); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (`make up`'s admin: user "
                "admin, password in .mlflow-auth/admin-password)"
            )
        if "error code 403" in text or "Permission denied" in text:
            return (
                f"MLflow at {tracking_uri} refused this to {user!r} (403: permission denied); "
                "ask its admin for the permission (docs/operations.md, who can do what)"
            )
    return None


class PermanentError(RuntimeError):
    """Bad config, bad or untracked data, a diverged run, an untrusted checkpoint."""

    handoff: dict | None = None  # a verdict the failed stage hands on (see ValidationFailed)


class ConfigError(PermanentError, ValueError):
    """params.yaml or an override names an unknown key or an impossible value."""


class DataError(PermanentError):
    """The dataset on disk is missing, unreadable, inconsistent or not the tracked version."""


class ValidationFailed(PermanentError):
    """The data failed its expectations; `report` (a `ValidationReport`) says which, `handoff`
    is the validate stage's result saying so (success false), recorded like a success would be."""

    def __init__(self, report, handoff: dict | None = None):
        self.report = report
        self.handoff = handoff
        super().__init__(report.describe())


class OutOfOrder(PermanentError):
    """A stage was called before the stage whose result it needs; the message names that one."""


class TrainingDiverged(PermanentError):
    """The loss became NaN/Inf; the run is stopped and nothing is registered."""


class CheckpointError(PermanentError):
    """A checkpoint file cannot be trusted or read; delete it to start over."""


class RegistryUnavailable(RuntimeError):
    """MLflow did not answer after its retries; a retry of the step finishes what it began."""
