"""Helpers for tests that run the long-lived services (`make up`) and talk to them over HTTP."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import add_make_files, free_port, run

MAKE = ["make", "-o", ".venv/.installed"]  # the test's interpreter is the installed .venv


def http(method: str, url: str, body=None, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, headers, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@contextmanager
def services(project: Path, env: dict[str, str] | None = None):
    """`make up` in a project copy on free ports; yields (env, its stdout); then `make down`."""
    add_make_files(project)
    env = {"AIRFLOW_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()), **(env or {})}
    try:
        yield env, run([*MAKE, "up"], project, env=env, timeout=300).stdout
    finally:
        run([*MAKE, "down"], project, env=env, check=False)


class Airflow:
    """The Airflow REST API of a running api-server, logged in as the generated admin."""

    def __init__(self, project: Path, port: str):
        self.url = f"http://127.0.0.1:{port}"
        passwords = project / ".airflow" / "simple_auth_manager_passwords.json.generated"
        self.password = json.loads(passwords.read_text())["admin"]
        login = {"username": "admin", "password": self.password}
        self.token = http("POST", f"{self.url}/auth/token", login)["access_token"]

    def __call__(self, method: str, path: str, body=None):
        return http(method, f"{self.url}/api/v2{path}", body, self.token)

    def wait_for_dag(self, dag_id: str) -> None:
        for _ in range(90):  # until the dag-processor has parsed it
            try:
                self("GET", f"/dags/{dag_id}")
                return
            except OSError:
                time.sleep(2)
        raise AssertionError(f"{dag_id} never appeared in the API")

    def trigger(self, dag_id: str, conf: dict) -> dict:
        return self("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})

    def wait_for_runs(self, dag_id: str, done, seconds: int = 480) -> list[dict]:
        """Poll the DAG's runs until done(runs) is true or the time is up; returns the last list."""
        deadline = time.monotonic() + seconds
        while True:
            runs = self("GET", f"/dags/{dag_id}/dagRuns")["dag_runs"]
            if done(runs) or time.monotonic() > deadline:
                return runs
            time.sleep(5)
