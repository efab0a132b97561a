"""Interrupted means ended: SIGTERM and SIGINT become an exception, so the work in progress ends
its records (the MLflow run KILLED, the Optuna trial FAIL) instead of leaving them RUNNING; and
the records a SIGKILLed process left RUNNING are recognised by the process named in them.

Airflow's task runner answers SIGTERM only with the operator's `on_kill` (the task body runs on),
so the DAG tasks install the same handler as the CLI around their body.

Inside `deferred()` (the training loop) a signal only marks the stop, and `pending` is checked at
step boundaries: an exception raised at an arbitrary point can leave an import lock held, and
MLflow's system-metrics thread, which imports as it samples, then hangs the process's exit.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)
pending: list[int] = []  # signals received inside `deferred()`, not yet raised
_deferring = [False]


class Interrupted(KeyboardInterrupt):
    """The process got SIGTERM or SIGINT; `signal` is its name."""

    def __init__(self, signum: int):
        self.signal = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal}")


@contextmanager
def raising_on_signals():
    """Within it, the first SIGTERM or SIGINT raises `Interrupted` in the main thread; a second
    one gets the handler that was there before (the default: the process ends at once), so a
    clean-up that hangs can still be stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def handler(signum, _frame):
        for s, h in previous.items():
            signal.signal(s, h)
        if _deferring[0]:
            pending.append(signum)
        else:
            raise Interrupted(signum)

    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    check()  # a signal that waited in a `deferred(check=False)` block: the work is done, stop now


@contextmanager
def deferred(check_on_exit: bool = True):
    """Within it, a signal waits in `pending` for `check()` (call it at safe points, often
    enough that a stop is prompt); leaving the block normally checks once more, unless
    `check_on_exit` is False (work that must finish whole: it is raised when
    `raising_on_signals` ends)."""
    before = _deferring[0]
    _deferring[0] = True
    try:
        yield
    finally:
        _deferring[0] = before
    if check_on_exit:
        check()


def check() -> None:
    """Raise `Interrupted` for a signal received inside `deferred()`."""
    if pending:
        signum = pending[0]
        pending.clear()
        raise Interrupted(signum)


def owner() -> dict[str, str]:
    """This process, as recorded on the runs and trials it opens."""
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def gone(host: str | None, pid: str | None) -> bool:
    """True when the recorded process ran on this host and no longer exists (SIGKILL, OOM,
    power loss); False when it lives, or ran elsewhere and so cannot be checked from here."""
    if host != socket.gethostname() or not (pid or "").isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
