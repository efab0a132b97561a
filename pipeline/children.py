"""Child Python processes that run this process's copy of the package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def python(args: list[str], **popen) -> subprocess.Popen:
    """`python -P <args>` importing this process's package, not a copy in the working directory
    (-P: nothing prepended to sys.path; the package's parent goes first on PYTHONPATH)."""
    import pipeline

    here = str(Path(pipeline.__file__).parents[1])
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-P", *args], env={**os.environ, "PYTHONPATH": path},
                            **popen)  # fmt: skip
