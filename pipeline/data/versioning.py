"""DVC helpers: the data version in data.dvc, integrity of data/ against it, pull, add, push.

`dvc repro` would silently re-hash and commit changed data, so the pipeline checks data/ against
data.dvc itself and refuses to go on when they differ.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack, chdir, contextmanager, nullcontext
from pathlib import Path

import yaml

from pipeline.data.store import DataError
from pipeline.files import exclusive, write_atomic, write_json

POINTER = "data.dvc"
# In DVC's own git-ignored scratch folder: a lock for writers of data/, and a marker that says a
# write of data/ started and was not yet recorded in data.dvc.
LOCK = ".dvc/tmp/pipeline-data.lock"
PENDING = ".dvc/tmp/pipeline-data-pending.json"
CHECKOUT_FIX = "dvc checkout --force data.dvc"
# DVC builds its index of data.dvc in a shared SQLite file on first use and commits it in parts;
# a second process reading it meanwhile sees data/ without its hash ("added: data/").
INDEX_LOCK = ".dvc/tmp/pipeline-index.lock"
LOCK_WAIT_ENV = "PIPELINE_DVC_LOCK_WAIT_S"  # how long to wait for another DVC command's lock


def pointer(repo_root: Path) -> dict:
    """data.dvc's entry for data/: md5 (`0a60....dir`), size, nfiles, hash, path."""
    path = Path(repo_root) / POINTER
    if not path.exists():
        raise DataError(f"{path} not found; run `pipeline data pull` to create the first version")
    try:
        out = yaml.safe_load(path.read_text())["outs"][0]
    except (KeyError, IndexError, TypeError, yaml.YAMLError):
        out = None
    if not isinstance(out, dict) or "md5" not in out:
        raise DataError(f"{path} has no outs[0].md5; restore it with `git checkout {POINTER}`")
    return out


def recorded_md5(repo_root: Path) -> str:
    """The directory md5 that data.dvc pins (e.g. `0a60....dir`)."""
    return pointer(repo_root)["md5"]


@contextmanager
def _repo(repo_root: Path):
    from dvc.repo import Repo

    # DVC resolves stage paths against the working directory, so work from the repo root.
    with chdir(repo_root):
        repo = Repo(str(repo_root))
        try:
            yield repo
        finally:
            repo.close()


@contextmanager
def locked_repo(repo_root: Path):
    """The DVC repo of `repo_root` with its repository lock held for the block. DVC gives up
    on a lock another DVC command holds after 3 s; this waits up to PIPELINE_DVC_LOCK_WAIT_S
    (default 120 s), then raises a DataError naming the lock, before anything was changed."""
    from dvc.lock import LockError
    from dvc.repo import lock_repo

    wait = float(os.environ.get(LOCK_WAIT_ENV) or 120)
    with _repo(repo_root) as repo, ExitStack() as held:
        deadline = time.monotonic() + wait
        while True:
            try:
                held.enter_context(lock_repo(repo))
                break
            except LockError:
                if time.monotonic() >= deadline:
                    raise DataError(
                        f"another DVC command holds the repository lock "
                        f"({Path(repo_root) / '.dvc' / 'tmp' / 'lock'}) for more than {wait:g} s; "
                        "nothing was changed. Run this again when it has finished (if no dvc "
                        "process runs, the lock is stale: delete it), or wait longer with "
                        f"{LOCK_WAIT_ENV}"
                    ) from None
                time.sleep(0.5)
        yield repo


def differences(repo_root: Path) -> list[str]:
    """Files of data/ that differ from data.dvc ('modified: data/x.npy'); empty when in sync."""
    with exclusive(Path(repo_root) / INDEX_LOCK), _repo(repo_root) as repo:
        status = repo.data_status(granular=True, untracked_files="no")
    changes = status.get("uncommitted", {})
    return [f"{kind}: {p}" for kind, paths in sorted(changes.items()) for p in paths]


def verify(repo_root: Path, data_dir: Path) -> str:
    """Return the data md5 if data/ matches data.dvc, else raise with what differs and the fixes."""
    if not Path(data_dir).exists():
        raise DataError(f"{data_dir} is missing; run `dvc pull` (or `pipeline data pull`)")
    state = _state(repo_root, data_dir)
    if state in _IN_SYNC:
        return _IN_SYNC[state]
    return _remember(state, refuse_differences(repo_root, data_dir, differences(repo_root)))


def verify_started(repo_root: Path, data_dir: Path) -> Callable[[], str]:
    """`verify` in a child process, on another core while this one loads torch: returns a
    `wait()` that gives the data md5 or raises what `verify` would. DVC's comparison is the
    slow part (importing DVC, hashing what changed)."""
    import subprocess

    from pipeline import children

    if not Path(data_dir).exists():
        raise DataError(f"{data_dir} is missing; run `dvc pull` (or `pipeline data pull`)")
    state = _state(repo_root, data_dir)
    if state in _IN_SYNC:  # a sweep's next trial
        return lambda: _IN_SYNC[state]
    child = children.python(
        ["-c", _DIFFERENCES, str(repo_root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    @functools.cache  # callers may wait more than once (lr: auto waits early)
    def wait() -> str:
        out, err = child.communicate()
        if child.returncode != 0:
            raise DataError(f"comparing {data_dir} with {POINTER} failed:\n{err[-2000:]}")
        return _remember(state, refuse_differences(repo_root, data_dir, json.loads(out)))

    return wait


# This process's verdicts: data/ found in sync with data.dvc, by the state they were found in.
# The state is data.dvc's text and each file's size, mtime, ctime and inode, what DVC itself
# trusts to skip re-hashing; a file changed within RACY_S of being looked at is never trusted
# (its next change could share the timestamp: git's "racily clean" rule). Spares a sweep's
# trials after the first DVC's 0.7 s each.
_IN_SYNC: dict[tuple, str] = {}
RACY_S = 2.0


def _state(repo_root: Path, data_dir: Path) -> tuple | None:
    import time

    files, newest = [], 0
    for path in sorted(Path(data_dir).rglob("*")):
        st = path.lstat()
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
        files.append((path.relative_to(data_dir).as_posix(), st.st_mode, st.st_size,
                      st.st_mtime_ns, st.st_ctime_ns, st.st_ino))  # fmt: skip
    if time.time_ns() - newest < RACY_S * 1e9:
        return None
    pointer_file = Path(repo_root) / POINTER
    text = pointer_file.read_text() if pointer_file.exists() else ""
    return (str(Path(repo_root).resolve()), text, tuple(files))


def _remember(state: tuple | None, md5: str) -> str:
    if state is not None:
        _IN_SYNC[state] = md5
    return md5


_DIFFERENCES = """
import json, sys
from pathlib import Path
from pipeline.data.versioning import differences
print(json.dumps(differences(Path(sys.argv[1]))))
"""


def refuse_differences(repo_root: Path, data_dir: Path, diff: list[str]) -> str:
    """The data md5 when `diff` (from `differences`) is empty; else DataError naming each
    difference and both fixes."""
    md5 = recorded_md5(repo_root)
    if diff:
        cause = (
            "\nAn interrupted `pipeline data pull` left it unrecorded: run `pipeline data pull` "
            "again to finish it."
            if pending_write(repo_root)
            else ""
        )
        raise DataError(
            f"{data_dir} does not match {POINTER} (md5 {md5}); refusing to use untracked data:\n  "
            + "\n  ".join(diff)
            + cause
            + f"\nFix: `{CHECKOUT_FIX}` to restore the tracked version, or "
            "`dvc add data && git commit data.dvc` to record this as a new version."
        )
    return md5


@contextmanager
def data_lock(repo_root: Path):
    """One writer of data/ at a time (DVC's own repo lock fails instead of waiting)."""
    with exclusive(Path(repo_root) / LOCK):
        yield


def mark_pending(repo_root: Path, recipe: dict) -> None:
    write_json(Path(repo_root) / PENDING, recipe)  # whole or absent: its presence is the signal


def pending_write(repo_root: Path) -> bool:
    return (Path(repo_root) / PENDING).exists()


def clear_pending(repo_root: Path) -> None:
    (Path(repo_root) / PENDING).unlink(missing_ok=True)


REGENERATE = (
    "regenerate it with `pipeline data pull --dataset NAME`, or `dvc push` it from a machine "
    "that has it"
)


def pull(repo_root: Path, fix: str = REGENERATE, repo=None) -> None:
    """Fetch the data/ of `repo_root`'s data.dvc from its cache or DVC remote; DataError naming
    the version and `fix` when neither has it. `repo`: a `locked_repo` already held."""
    from dvc.exceptions import DvcException

    with nullcontext(repo) if repo is not None else locked_repo(repo_root) as repo:
        try:
            repo.pull(targets=[POINTER])
        except DvcException as exc:
            raise DataError(
                f"data version {recorded_md5(repo_root)} is not in the local cache or the DVC "
                f"remote ({exc}); {fix}"
            ) from None


def checkout(repo_root: Path, pinned: dict) -> bool:
    """Make data/ hold the version `pinned` (a data.dvc entry, `pointer`) from the cache or the
    DVC remote, whatever this workspace recorded: data.dvc is rewritten to it and data/ pulled,
    under the repository lock. True when it changed; nothing when data.dvc pins it already.
    DataError naming the version when no store has it (data.dvc then stays as it was)."""
    if pointer(repo_root)["md5"] == pinned["md5"]:
        return False
    path = Path(repo_root) / POINTER
    with locked_repo(repo_root) as repo:
        before = path.read_text()
        write_atomic(path, lambda out: yaml.safe_dump({"outs": [pinned]}, out, sort_keys=False))
        try:
            pull(repo_root, "`dvc push` it from the machine that published it", repo=repo)
        except DataError:
            write_atomic(path, lambda out: out.write(before))
            raise
    return True


def add(repo_root: Path, data_dir: Path, repo) -> str:
    """Record data/ as the current version in data.dvc (and the local cache); `repo`: a
    `locked_repo` held since before data/ was written. Returns the version's md5."""
    repo.add(str(Path(data_dir).resolve().relative_to(Path(repo_root).resolve())))
    return recorded_md5(repo_root)


def push(repo_root: Path, repo) -> None:
    """Store data.dvc's version in the default DVC remote. A failed upload (a full disk, a
    remote that refuses) is one DataError naming DVC's first reason and the fix, instead of
    DVC's line per file and its traceback: the version is recorded and cached already, so
    `dvc push` alone finishes it."""
    from dvc.exceptions import UploadError

    with _dvc_errors() as reasons:
        try:
            repo.push(targets=[POINTER])
        except UploadError as exc:
            first = reasons[0] if reasons else str(exc)
            raise DataError(
                f"data version {recorded_md5(repo_root)} is recorded in {POINTER} and the "
                f"local cache, but storing it in the DVC remote failed ({exc}; the first: "
                f"{first}). Fix the remote (free space on it) and run `dvc push`"
            ) from None


@contextmanager
def _dvc_errors():
    """DVC's ERROR log records during the block (its loggers, as `dvc.logger.setup` names
    them), kept instead of printed: a list of their causes."""
    import logging

    reasons: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                cause = record.exc_info[1] if record.exc_info else None
                reasons.append(str(cause) if cause else record.getMessage())

    loggers = [logging.getLogger(name) for name in ("dvc", "dvc_objects", "dvc_data")]
    saved = [(log.handlers[:], log.propagate) for log in loggers]
    for log in loggers:
        log.handlers, log.propagate = [Keep()], False
    try:
        yield reasons
    finally:
        for log, (handlers, propagate) in zip(loggers, saved, strict=True):
            log.handlers, log.propagate = handlers, propagate
