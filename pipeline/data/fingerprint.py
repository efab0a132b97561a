"""A source folder's content, so a data version's identity is what it was made from.

Content hashes, not sizes and modification times: a copy, a `git clone` or an rsync changes every
mtime without changing a pixel, and a new data version for the same photos would be a lie. The
cost is one read of the source per pull, a fraction of decoding it (BENCHMARKS.md, "Data at
size"). Kept per folder (a class), so a change can be said in a user's terms.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path


def fingerprint(root: Path, files: list[str]) -> dict[str, dict]:
    """{folder under root: {"files": count, "md5": digest of names + contents}} of `files`."""
    digests: dict[str, hashlib._Hash] = defaultdict(hashlib.md5)
    counts: dict[str, int] = defaultdict(int)
    for file in sorted(files):
        path = Path(file)
        folder = str(path.parent.relative_to(root))
        with path.open("rb") as handle:
            content = hashlib.file_digest(handle, "md5").hexdigest()
        digests[folder].update(f"{path.name}\0{content}\n".encode())
        counts[folder] += 1
    return {k: {"files": counts[k], "md5": digests[k].hexdigest()} for k in sorted(digests)}


def describe_change(old: dict | None, new: dict | None) -> str:
    """'+40 files, new folder c (20 files), b: 10 -> 8 files, a: files replaced'."""
    old, new = old or {}, new or {}
    added = sum(v["files"] for v in new.values()) - sum(v["files"] for v in old.values())
    parts = [f"{added:+d} {_files(added)}"] if added else []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if key == ".":  # files beside the folders: counted, never "a new folder"
            before, after = before or {"files": 0, "md5": ""}, after or {"files": 0, "md5": ""}
        folder = "top level" if key == "." else repr(key)
        if before is None:
            parts.append(f"new folder {folder} ({after['files']} {_files(after['files'])})")
        elif after is None:
            parts.append(f"folder {folder} gone ({before['files']} {_files(before['files'])})")
        elif before["files"] != after["files"]:
            parts.append(f"{folder}: {before['files']} -> {after['files']} files")
        elif before["md5"] != after["md5"]:
            parts.append(f"{folder}: files replaced or changed")
    return ", ".join(parts) or "source content changed"


def _files(n: int) -> str:
    return "file" if abs(n) == 1 else "files"
