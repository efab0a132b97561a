"""`pipeline` command line: parse, run the subcommand's handler, and turn the failures that have
a known cause and fix into one line on stderr and a non-zero exit code."""

from __future__ import annotations

import errno
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from pipeline import interrupts
from pipeline.cli.commands import HANDLERS, LOCAL_COMMANDS, PROJECTLESS
from pipeline.cli.parser import build_parser
from pipeline.errors import ConfigError, DataError, PermanentError, ValidationFailed, chain
from pipeline.settings import Settings

# How SQLite and PostgreSQL say their disk is full (from MLflow, sometimes only as text).
STORE_FULL = ("database or disk is full", "could not extend file")

__all__ = ["build_parser", "entry", "main"]


def entry() -> None:
    """The `pipeline` program: `main()`, then exit. What is left is freed with the process;
    frozen first, it is skipped by the collector's passes at exit: a process that imported
    torch and took an optimizer step spent 0.78 s from its last line to its exit, 0.19 s
    frozen (mean of 3 each, here). Exit handlers and finalizers still run."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `pipeline status | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    gc.freeze()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # stdout is the command's JSON result: no download bars, no "View run at" lines in it.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow logs a store error with its traceback and raises it: this command reports it
    # once (one line for the known ones, a disk full, a broken store; else the traceback).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    settings = Settings.from_env()
    if args.command not in PROJECTLESS and not (
        _project_found(settings) or getattr(args, "params", None)
    ):
        print(
            f"error: no params.yaml in {settings.root} or a folder above it: run `pipeline` in "
            "the project's checkout, or set PIPELINE_ROOT to it (and MLFLOW_TRACKING_URI to "
            "read a registry that lives elsewhere)",
            file=sys.stderr,
        )
        return 2
    try:
        with interrupts.raising_on_signals():
            if args.command not in LOCAL_COMMANDS:
                from pipeline.tracking.server import wait_for_server

                wait_for_server(settings)
            return HANDLERS[args.command](args, settings)
    except interrupts.Interrupted as exc:  # the stage ended its MLflow run KILLED
        print(f"stopped: {exc}", file=sys.stderr)
        return 128 + getattr(signal, exc.signal)
    except (PermanentError, LookupError) as exc:  # LookupError: a model that does not resolve
        print(_permanent(exc), file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except Exception as exc:
        message = _known_failure(exc, settings)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1


def _project_found(settings: Settings) -> bool:
    """A project to work in: params.yaml, or a registry named in MLFLOW_TRACKING_URI. Without
    either, a command would make an empty store wherever it was run and report on that."""
    return settings.params.is_file() or bool(os.environ.get("MLFLOW_TRACKING_URI"))


def _permanent(exc: Exception) -> str:
    if isinstance(exc, ValidationFailed):  # the stage printed the full report already
        return "error: validation failed; this data version must not be trained on"
    kind = {ConfigError: "config error", DataError: "data error"}.get(type(exc), "error")
    return f"{kind}: {exc}"


def _known_failure(exc: Exception, settings: Settings) -> str | None:
    """One line for failures that have a known cause and fix, else None (a traceback)."""
    from pipeline.errors import RegistryUnavailable

    if isinstance(exc, RegistryUnavailable):
        return f"error: {exc}"
    full = _disk_full(exc, settings)
    if full is not None:
        return (
            f"error: disk full{full}; nothing half-written was kept. Free space on that disk "
            "and run the command again (`--resume` continues a training from its checkpoint)"
        )
    from pipeline.errors import mlflow_refusal
    from pipeline.tracking.server import connection_failure

    refused = mlflow_refusal(exc, settings.tracking_uri)
    if refused:
        return f"error: {refused}"
    if any(connection_failure(e) for e in chain(exc)):  # after MLflow's own bounded retries
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return (
            f"error: MLflow at {settings.tracking_uri} stopped answering ({first}); this command "
            "stopped there. Start it (or fix MLFLOW_TRACKING_URI) and run the command again "
            "(`pipeline train --resume` continues a training from its last checkpoint)"
        )
    store_error = _store_error(exc)
    if store_error and "database is locked" in store_error:  # transient: never "move it aside"
        return (
            f"error: the MLflow store at {settings.tracking_uri} stayed locked by another process "
            "past SQLite's wait (a long write by another command); this command stopped there. "
            "Run it again when the other has finished"
        )
    if store_error:
        return (
            f"error: the MLflow store at {settings.tracking_uri} cannot be read ({store_error}); "
            "restore it from a backup, or move it aside to start an empty store"
        )
    return None


def _disk_full(exc: BaseException, settings: Settings) -> str | None:
    """Where the disk filled up (" writing FILE", " under the MLflow store FOLDER", " under
    FOLDER", or ""), when `exc` comes from a full disk; else None. The store's error arrives
    as text when the recorder process met it, so its words are matched."""
    causes = list(chain(exc))
    full = [e for e in causes if isinstance(e, OSError) and e.errno == errno.ENOSPC]
    named = [e.filename for e in full if e.filename]
    if named:
        return f" writing {named[0]}"
    uri = settings.tracking_uri
    store = settings.sqlite_store.parent if settings.sqlite_store else None
    if any(words in str(e) for e in causes for words in STORE_FULL):
        return f" under the MLflow store {store or uri}"
    if not full:
        return None
    # A library's write (GX's stores, a temporary file) that did not say which file: the
    # folders this command writes to whose disk has no room left.
    candidates = [settings.outputs, settings.checkpoints, settings.reports, settings.root, store]
    candidates.append(Path(tempfile.gettempdir()))
    seen, names = set(), []
    for folder in (c.resolve() for c in candidates if c is not None and c.exists()):
        device = folder.stat().st_dev
        if device not in seen and shutil.disk_usage(folder).free < 2**20:
            seen.add(device)
            names.append(str(folder))
    return f" under {', '.join(names)}" if names else ""


def _store_error(exc: BaseException) -> str | None:
    """The database error behind an MLflow failure (a corrupt or foreign mlflow.db), if any."""
    from sqlalchemy.exc import DatabaseError

    for cause in chain(exc):
        if isinstance(cause, DatabaseError):
            return str(cause.orig or cause).splitlines()[0]
    return None
