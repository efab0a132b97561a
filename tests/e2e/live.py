"""Helpers for tests that run the long-lived services (`make up`) and talk to them over HTTP, and
that stop a training part-way."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import BIN, add_make_files, free_port, project_env, run, stop_group

MAKE = ["make", "-o", ".venv/.installed"]  # the test's interpreter is the installed .venv


def http(method: str, url: str, body=None, token=None, login: tuple[str, str] | None = None):
    """JSON in and out; `token`: a bearer token (Airflow), `login`: (user, password) for basic
    auth (MLflow)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if login:
        encoded = base64.b64encode(":".join(login).encode()).decode()
        headers["Authorization"] = f"Basic {encoded}"
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


def mlflow_login(project: Path) -> tuple[str, str]:
    """The MLflow server's admin login that `make up` generated."""
    return "admin", (project / ".mlflow-auth" / "admin-password").read_text().strip()


class Airflow:
    """The Airflow REST API of a running api-server, logged in as the generated admin."""

    def __init__(self, project: Path, port: str, host: str = "127.0.0.1"):
        self.url = f"http://{host}:{port}"
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

    def wait_for_runs(self, dag_id: str, done, seconds: int = 1200) -> list[dict]:
        """Poll the DAG's runs until done(runs) is true or the time is up; returns the last list.

        The DAGs take one run at a time (max_active_runs=1), so two runs on a loaded 2-core CI
        machine beside three other test workers took over 480 s: the default waits 20 minutes."""
        deadline = time.monotonic() + seconds
        runs: list[dict] = []
        while True:
            try:
                runs = self("GET", f"/dags/{dag_id}/dagRuns")["dag_runs"]
            except urllib.error.HTTPError:
                raise
            except (TimeoutError, urllib.error.URLError):  # starved by other workers: ask again
                pass
            if done(runs) or time.monotonic() > deadline:
                return runs
            time.sleep(5)


class _Started:
    """A server process (`proc`) at `url`: entered once `ready` answers, stopped on exit."""

    ready = "/ping"

    def __enter__(self):
        try:
            wait_http(f"{self.url}{self.ready}", self.proc)
        except BaseException:
            stop_group(self.proc)
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop_group(self.proc)


class ServedModel(_Started):
    """`mlflow models serve` of `uri` in the project's environment, on a free port."""

    def __init__(self, project: Path, uri: str):
        self.url = f"http://127.0.0.1:{free_port()}"
        command = ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
        host, port = self.url.removeprefix("http://").split(":")
        self.proc = subprocess.Popen(
            [str(BIN / command[0]), *command[1:], "-h", host, "-p", port],
            cwd=project,
            env=project_env(project),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def invocations(self, inputs) -> tuple[int, dict]:
        """(HTTP status, JSON answer) for `{"inputs": inputs}`."""
        request = urllib.request.Request(
            f"{self.url}/invocations",
            json.dumps({"inputs": inputs}).encode(),
            {"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


class MlflowServer(_Started):
    """`mlflow server` on `store` (a backend store URI) in the project's environment plus `env`,
    on a free port; `args` go after its own (`--artifacts-destination ...`)."""

    ready = "/health"

    def __init__(self, project: Path, store: str, *args: str, env: dict | None = None):
        self.url = f"http://127.0.0.1:{free_port()}"
        # no job runner: nothing to drain when it stops
        self.env = {**project_env(project), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.env |= env or {}
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--workers", "1",
             "--port", self.url.rsplit(":", 1)[1], "--backend-store-uri", store, *args],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


class PipelineServer(_Started):
    """`pipeline serve` in the project, on a free port, its log in `log`; ready when entered."""

    ready = "/ready"  # its /ping answers while the model loads

    def __init__(self, project: Path, *args: str, env: dict | None = None):
        """`args` after `pipeline serve --port P`; "{url}" in them is the server's own URL."""
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = project / f"serve-{self.url.rsplit(':', 1)[1]}.log"
        args = tuple(a.replace("{url}", self.url) for a in args)
        self.proc = subprocess.Popen(
            [str(BIN / "pipeline"), "serve", "--port", self.url.rsplit(":", 1)[1], *args],
            cwd=project,
            env=env or project_env(project),
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
            start_new_session=True,
        )

    def post(self, body: bytes, content_type="application/json", timeout=120):
        """(HTTP status, JSON answer, headers) of POST /invocations with `body`."""
        request = urllib.request.Request(
            f"{self.url}/invocations", body, {"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read()), response.headers
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read()), error.headers

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            text = response.read().decode()
        return text if path == "/metrics" else json.loads(text)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when it has not been recorded yet)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as it prints them
        key = f"{name}{{{want}}}" if want else name
        for line in self.get("/metrics").splitlines():
            if line.rsplit(" ", 1)[0] == key:
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def wait_http(url: str, proc: subprocess.Popen, seconds: int = 90) -> None:
    for _ in range(seconds * 4):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer")


def kill_after_epoch(
    project: Path, command: list[str], epoch: int, sig=signal.SIGKILL, recorder_too=False
) -> str:
    """Send `sig` to a training `command` (`pipeline train ...`, `pipeline compress ...`) as
    soon as it reports `epoch` (its checkpoint is on disk); returns what it said after that.
    `recorder_too`: SIGKILL its MLflow recorder process first, as a machine that loses power
    would."""
    import psutil

    proc = subprocess.Popen(
        command,
        cwd=project,
        env=project_env(project),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        if line.startswith(f"epoch {epoch:>3}/"):
            if recorder_too:
                (recorder,) = psutil.Process(proc.pid).children()
                recorder.kill()
                recorder.wait(timeout=30)
            proc.send_signal(sig)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    expected = -sig if sig == signal.SIGKILL else 128 + sig
    assert proc.returncode == expected, f"training ended {proc.returncode}: {rest[-2000:]}"
    return rest
