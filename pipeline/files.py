"""Atomic file writes: a reader (or the next stage) never sees half a file, and a crash or a full
disk leaves the previous file as it was."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(path: Path, write: Callable[[IO], None], mode: str = "w") -> Path:
    """Call `write(handle)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"newline": ""} if "b" not in mode else {})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # after a failed write (a full disk): no leftover
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def write_json(path: Path, payload: dict) -> Path:
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    return write_atomic(path, lambda handle: handle.write(text))
