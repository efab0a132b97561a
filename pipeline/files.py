"""Atomic file writes: a reader (or the next stage) never sees half a file, and a crash or a full
disk leaves the previous file as it was. Names and paths from outside (a form, a conf, the CLI)
checked before the project writes where they point."""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import secrets
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pipeline.errors import ConfigError, chain

ABANDONED_AFTER_S = 10  # a temporary file this old and unlocked was left by a killed writer


def write_atomic(path: Path, write: Callable[[IO], None], mode: str = "w") -> Path:
    """Call `write(handle)` on a temporary file beside `path`, fsync it, then rename it over
    `path`: a reader sees the old file or the new one, never half of one.

    The temporary name is unique (`.NAME.<random>.tmp`), so writers of the same file at once
    (two commands in one workspace) never rename each other's; the last rename wins whole. A
    failed write (a full disk) removes its own temporary file; one a killed writer left is
    removed by the next write (a live writer holds a lock on its own)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never another writer's file; 0o666 less the umask, as open() would create it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)  # released when this process ends, however it ends
    try:
        with open(fd, mode, **({} if "b" in mode else {"newline": ""})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        if disk_full(exc):  # torch.save says "unexpected pos"; name the file that did not fit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write: no leftover
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def _remove_abandoned(path: Path) -> None:
    """Delete the temporary files of `path` whose writer is gone: their lock can be taken, and
    they are older than a writer needs to take it after creating one."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, or a link: not ours
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - os.fstat(fd).st_mtime > ABANDONED_AFTER_S:
                tmp.unlink(missing_ok=True)
        except BlockingIOError:
            pass  # a writer at work
        finally:
            os.close(fd)


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` or an exception it was raised from is a full disk (ENOSPC)."""
    return any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain(exc))


@contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock on the file `path` (made if missing, never truncated) for the
    block: one process at a time, on this machine; released however the process ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def write_json(path: Path, payload: dict) -> Path:
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    return write_atomic(path, lambda handle: handle.write(text))


MAX_NAME_BYTES = 200  # a lock file's name, "promotion-NAME.lock", stays under 255 bytes


def safe_name(name: str, what: str) -> str:
    """`name` when it can name a file of its own (a model name in a lock file's name): not
    empty, at most MAX_NAME_BYTES in UTF-8, no `/`, `\\`, `:`, control or invisible format
    characters (a right-to-left override would make a name read as another), not `.` or
    `..` (MLflow refuses `/` and `:` in model names too). Else ConfigError naming `what`,
    before anything is written."""
    import unicodedata

    bad = sorted({c for c in name if c in "/\\:" or unicodedata.category(c) in ("Cc", "Cf")})
    size = len(name.encode())
    if not name.strip() or name in (".", "..") or bad or size > MAX_NAME_BYTES:
        why = (
            f"holds {' '.join(map(ascii, bad))}" if bad
            else f"is {size} bytes long (at most {MAX_NAME_BYTES})" if size > MAX_NAME_BYTES
            else "is empty, '.' or '..'"
        )  # fmt: skip
        raise ConfigError(
            f"{what} {ascii(name) if bad else repr(name[:60])} {why}: a model name is one word "
            "of a path (e.g. image-classifier); no '/', '\\', ':', control or format characters"
        )
    return name


def confined(path: str | Path, roots: list[Path], what: str, setting: str) -> Path:
    """`path` resolved (links and `..` followed) when it lies under one of `roots`, else
    ConfigError naming it, the roots and `setting`, the variable that widens them."""
    resolved = Path(path).expanduser().resolve()
    if any(resolved.is_relative_to(Path(root).resolve()) for root in roots):
        return resolved
    raise ConfigError(
        f"{what} {path} is outside the folders this may use ({', '.join(map(str, roots))}); "
        f"move it there, or add its folder to {setting} (separated by '{os.pathsep}')"
    )
