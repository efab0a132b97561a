"""Projects built once per test session and copied into each test that starts from one.

Pulling and validating digits takes ~20 s and training + evaluating a model ~30 s more on this
machine; many tests need such a project but check neither step, so they start from a copy (tests
that check a step run it themselves). Under xdist the first worker that asks builds a template
and the others wait for it on a file lock: each template is built once per `make test`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
from pathlib import Path

from tests.conftest import REPO, fresh_clone, run

# name: (template it starts from or None for a fresh clone, commands run in it)
RECIPES: dict[str, tuple[str | None, list[list[str]]]] = {
    "pulled": (None, [["pipeline", "data", "pull"]]),
    "validated": ("pulled", [["pipeline", "validate"]]),
    # One evaluated, unregistered run of the default recipe, 2 epochs (outputs/train.json).
    "trained": (
        "validated",
        [["pipeline", "train", "--set", "train.epochs=2"], ["pipeline", "evaluate"]],
    ),
    # That run registered as champion v1 (no accuracy floor: the policy is not under test).
    "registered": ("trained", [["pipeline", "register", "--set", "register.floor=0"]]),
    # The metadata DB as `make run` leaves it: migrated, with the DAGs' pools.
    "airflow": ("pulled", [[str(REPO / "scripts" / "airflow-init.sh")]]),
}
# Folders of binary data and git objects: no absolute path to rewrite there.
SKIP_DIRS = {".git", "cache", "dvc-storage", "data"}


def template(shared: Path, name: str) -> Path:
    """The finished template `name` under `shared` (a folder every xdist worker sees)."""
    path, ready = shared / name, shared / f"{name}.ready"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not ready.exists():  # not built, or a build that failed half-way
            shutil.rmtree(path, ignore_errors=True)
            base, commands = RECIPES[name]
            if base is None:
                fresh_clone(path)
            else:
                copy_project(template(shared, base), path)
            for command in commands:
                run(command, path)
            ready.touch()
    return path


def add_airflow_db(shared: Path, project: Path) -> None:
    """The `airflow` template's migrated metadata DB (it names no project path) in `project`."""
    (project / ".airflow").mkdir(exist_ok=True)
    shutil.copy2(template(shared, "airflow") / ".airflow" / "airflow.db", project / ".airflow")


def trained_run(project: Path) -> str:
    """The MLflow run id of the `trained` template's run."""
    return json.loads((project / "outputs" / "train.json").read_text())["run_id"]


def copy_project(src: Path, dst: Path) -> Path:
    """Copy a project and rewrite the absolute paths its stores recorded (MLflow keeps
    `file://<project>/.mlflow/artifacts/...` in its database and MLmodel files)."""
    shutil.copytree(src, dst, symlinks=True)
    old, new = str(src), str(dst)
    db = dst / ".mlflow" / "mlflow.db"
    if db.exists():
        _replace_in_database(db, old, new)
        # A path left behind would make the copy read and write the template's artifacts.
        assert old.encode() not in db.read_bytes(), f"{db} still names {old}"
    for folder, dirs, files in os.walk(dst):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            path = Path(folder, name)
            data = path.read_bytes()
            if old.encode() in data and b"\0" not in data:
                path.write_bytes(data.replace(old.encode(), new.encode()))
    return dst


def _replace_in_database(db: Path, old: str, new: str) -> None:
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for column in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                name, kind = column[1], column[2].upper()
                if kind.startswith(("VARCHAR", "TEXT", "CHAR")) or kind == "":
                    con.execute(
                        f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) '
                        f'WHERE instr("{name}", ?) > 0',
                        (old, new, old),
                    )
    con.execute("VACUUM")  # drops the old values' pages, so the check below can read the file
    con.close()  # the context manager commits but does not close
