"""What can go wrong, by whether a retry can fix it.

`PermanentError` and its kinds will not fix themselves: the CLI reports them in one line and the
DAG tasks fail at once, without retries. `RegistryUnavailable` is transient: retried with backoff.
"""

from __future__ import annotations


def chain(exc: BaseException | None):
    """`exc`, then the exceptions it was raised from or during, innermost last."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


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
