"""Shared fixtures: the bundled digits dataset and throw-away copies of the project."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a fresh clone holds that the pipeline reads (code comes from the installed package).
PROJECT_FILES = [
    "params.yaml",
    "dvc.yaml",
    "data.dvc",
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
    "dags",
    "pipeline",
]


def pytest_configure(config):
    # Under xdist there is one worker per core: one compute thread each (in the worker and the
    # pipelines it starts) instead of every worker's torch fighting for both cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Tiers are checked: an e2e test without `slow` would run in `make test-fast`.

    Under xdist (`--dist worksteal` gives each worker a contiguous share of this list): the `long`
    tests, then the other slow ones, dealt round-robin, so each worker starts on long tests and
    ends on short ones that idle workers steal, instead of one worker holding the long ones."""
    untiered = [i.nodeid for i in items if "/e2e/" in i.nodeid and not i.get_closest_marker("slow")]
    if untiered:
        raise pytest.UsageError(f"end-to-end tests must be marked slow: {untiered}")
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    if workers < 2:
        return
    order = sorted(
        items,
        key=lambda item: (not item.get_closest_marker("long"), not item.get_closest_marker("slow")),
    )
    items[:] = [item for k in range(workers) for item in order[k::workers]]


def stop_group(proc: subprocess.Popen, grace: int = 60) -> None:
    """SIGTERM a server started with start_new_session, SIGKILL it if it outlives `grace` s.

    A loaded CI machine has taken over 30 s to let an MLflow server drain; the tests need it
    down, not drained. A group already gone (a test stopped it) is left as it is."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait(timeout=grace)
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def project_env(root: Path) -> dict[str, str]:
    """Environment that points the CLI, Airflow and MLflow at a project copy and its own stores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PIPELINE_ROOT=str(root),
        AIRFLOW_HOME=str(root / ".airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(root / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        GX_ANALYTICS_ENABLED="false",
        MLFLOW_TRACKING_URI=f"sqlite:///{root}/.mlflow/mlflow.db",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@localhost",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@localhost",
    )
    return env


def run(cmd: list[str], root: Path, check: bool = True, timeout: int = 600, env=None):
    result = subprocess.run(
        cmd,
        cwd=root,
        env={**project_env(root), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def add_make_files(project: Path) -> None:
    """What `make` needs in a project copy, committed, with the already-installed .venv."""
    for name in ("Makefile", "pyproject.toml", "requirements.lock", "scripts"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, project / name)
    (project / ".venv").symlink_to(BIN.parent)
    git(project, "add", "-A")
    git(project, "commit", "-qm", "make files")


def fresh_clone(root: Path) -> Path:
    """A fresh clone of the project's tracked files (no data/, no stores) in its own git repo."""
    root.mkdir()
    for name in PROJECT_FILES:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "fresh clone")
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return fresh_clone(tmp_path / "project")


@pytest.fixture(scope="session")
def templates(tmp_path_factory) -> Path:
    """Where this session's project templates are built: one folder all xdist workers share."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture
def from_template(templates, tmp_path):
    """`from_template(name)`: a copy of a session-built project (tests/templates.py RECIPES);
    `folder` names a second copy's (another workspace, as on another host)."""
    from tests.templates import copy_project, template

    def copy(name: str, folder: str = "project") -> Path:
        return copy_project(template(templates, name), tmp_path / folder)

    return copy


@pytest.fixture
def new_database():
    """`new_database(role)`: the name of a fresh PostgreSQL database on 127.0.0.1:5432 (user
    postgres), dropped with its connections when the test ends."""
    import uuid

    import psycopg2

    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test")
    admin.autocommit = True
    made = []

    def create(role: str) -> str:
        made.append(f"pipeline_{role}_{uuid.uuid4().hex[:8]}")
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{made[-1]}"')
        return made[-1]

    try:
        yield create
    finally:
        with admin.cursor() as cursor:
            for name in made:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def digits():
    from pipeline.config import DataConfig
    from pipeline.data.sources import load_source

    return load_source("digits", DataConfig())


@pytest.fixture
def webhook():
    """A loopback HTTP server that records each JSON body POSTed to it."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs, filled on demand (`fill_disk(disk)`), unmounted afterwards: a full disk that
    never fills the real one (CI runs as root, as mount needs)."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill_disk(disk: Path) -> Path:
    """Every free byte of `disk` taken by one file; delete it to free the space again."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for size in (65536, 4096, 512, 1):  # down to the last partial block
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler
