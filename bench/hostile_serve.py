"""What hostile requests do to `mlflow models serve` and to `pipeline serve` of the champion:
status, answer size, time and the server's peak RSS, one request at a time, each followed by a
good request.

MLflow's scoring server parses the body before the model sees it, so the model's limits (the
serving pixel limit, the contract's checks) act only on what parses; `pipeline serve` bounds the
body, the image count and the JSON before that (docs/serving.md). Run after `make repro` (the
project's champion): `.venv/bin/python bench/hostile_serve.py` writes
bench/out/hostile_serve.json, one table per server.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile import _header_only  # noqa: E402  (the same header-only PNG)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "hostile_serve.json"
BIN = Path(sys.executable).parent


def _png(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _bodies() -> dict[str, bytes]:
    bomb16 = np.zeros((9000, 9000), np.uint16)
    bomb16[:4500] = 65535
    bombs = {
        "16-bit PNG bomb 9000x9000": _png(bomb16),
        "8-bit PNG bomb 9000x9000": _png(np.zeros((9000, 9000), np.uint8)),
        "header claims 60000x60000": base64.b64encode(_header_only(60000, 60000)).decode(),
    }
    del bomb16
    bodies = {name: json.dumps({"inputs": [b64]}).encode() for name, b64 in bombs.items()}
    tiny = _png(np.zeros((8, 8), np.uint8))
    bodies["10,000 tiny images"] = json.dumps({"inputs": [tiny] * 10_000}).encode()
    bodies["50 MB bad body"] = b'{"inputs": ["' + b"!" * (50 * 2**20) + b'"]}'
    bodies["JSON nested 100,000 deep"] = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    bodies["a 5,000-digit integer"] = b'{"inputs": [[[[' + b"9" * 5000 + b"]]]]}"
    return bodies


class _Peak(threading.Thread):
    """The largest RSS of a process and its children, sampled every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.02)


def _post(url: str, body: bytes) -> tuple[int, int, float]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            status, size = answer.status, len(answer.read())
    except urllib.error.HTTPError as exc:
        status, size = exc.code, len(exc.read())
    return status, size, time.perf_counter() - start


SERVERS = {
    "mlflow models serve": (
        ["mlflow", "models", "serve", "-m", "models:/image-classifier@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p"], "/ping",
    ),
    "pipeline serve": (["pipeline", "serve", "--port"], "/ready"),
}  # fmt: skip


def hostile(name: str, bodies: dict[str, bytes]) -> dict:
    """Each body sent to the server `name`, then a good request; its idle RSS first."""
    import psutil

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command, ready = SERVERS[name]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ROOT}/.mlflow/mlflow.db"}
    server = subprocess.Popen(
        [str(BIN / command[0]), *command[1:], str(port)], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/invocations"
    good = json.dumps({"inputs": [_png(np.full((8, 8), 200, np.uint8))]}).encode()
    results = {}
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        _post(url, good)  # warm-up
        root = psutil.Process(server.pid)
        procs = [root, *root.children(recursive=True)]
        results["idle_mib"] = round(sum(p.memory_info().rss for p in procs) / 2**20)
        for what, body in bodies.items():
            peak = _Peak(server.pid)
            peak.start()
            time.sleep(0.1)
            status, size, seconds = _post(url, body)
            peak.stop.set()
            peak.join()
            after = _post(url, good)[0]
            results[what] = {
                "body_mb": round(len(body) / 2**20, 2),
                "status": status,
                "answer_kb": round(size / 1024, 1),
                "seconds": round(seconds, 2),
                "server_peak_mib": round(peak.peak / 2**20),
                "good_request_after": after,
            }
            print(f"{name:20} {what:28} {results[what]}", file=sys.stderr)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    return results


def main() -> dict:
    bodies = _bodies()
    return {name: hostile(name, bodies) for name in SERVERS}


if __name__ == "__main__":
    results = main()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
