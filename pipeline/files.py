"""Atomic file writes: a reader (or the next stage) never sees half a file, and a crash or a full
disk leaves the previous file as it was."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(path: Path, write: Callable[[IO], None], mode: str = "w") -> Path:
    """Call `write(handle)` on `.NAME.tmp` beside `path`, fsync it, then rename it over `path`.

    The temporary name is fixed, so the next write replaces what a killed writer left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write (a full disk): no leftover
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def write_json(path: Path, payload: dict) -> Path:
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    return write_atomic(path, lambda handle: handle.write(text))
