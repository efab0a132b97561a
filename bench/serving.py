"""What serving costs: the MLflow model's wrapper per image against the bare network, and
`pipeline serve` against `mlflow models serve` over HTTP, in one run.

The champion of the project's registry (run `make repro` first) is loaded twice: as the bare
network (`load_weights`: the same weights, float32 in, logits out) and as the MLflow model
(`mlflow.pyfunc.load_model`: the input contract's checks, the class names and probabilities in
a DataFrame; for files, the decoding too). Each is timed on the test split as uint8 pixels, and
the pyfunc also on the same images as base64 PNG files, at batch 1 and batch 256; medians of
`--repeats` passes, microseconds per image, and the ratio to the bare network.

Over HTTP (`--seconds` per cell): both servers of the champion (ours also with 2 workers, and
without its prediction log), one base64 PNG test image per request from 1, 8 and 32 client
threads (keep-alive connections), images/s and latency percentiles; the served images/s at 32
against the bare network's batch-256 images/s, and with the log on against off; and an alias
flip under load at 8 threads (in a copy of the registry, the champion moved to a second
version of the same run): failed requests and seconds from the move to the first answer of the
new version. `.venv/bin/python bench/serving.py` writes bench/out/serving.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "serving.json"
BIN = Path(sys.executable).parent
NAME = "image-classifier"


def _per_image_us(fn, batches: list, repeats: int) -> float:
    fn(batches[0])  # warm-up: first-call allocations, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / sum(len(b) for b in batches) * 1e6


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(command: list[str], port: int, env: dict) -> subprocess.Popen:
    """The server, once it answers: /ready for ours (its /ping answers while it loads); with
    --workers N, once N workers report their version in /metrics."""
    ready = "/ready" if "pipeline" in command[0] else "/ping"
    workers = int(command[command.index("--workers") + 1]) if "--workers" in command else 1
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    server = subprocess.Popen(command, env=env, start_new_session=True, cwd=ROOT, **quiet)
    for _ in range(240):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", ready)
            answer = connection.getresponse()
            answer.read()
            if answer.status == 200 and (workers == 1 or _workers_serving(connection) == workers):
                return server
        except OSError:
            pass
        time.sleep(0.5)
    os.killpg(server.pid, 15)
    raise RuntimeError(f"{command[:3]} did not start")


def _workers_serving(connection: http.client.HTTPConnection) -> int:
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    return text.count("pipeline_serve_model_version{pid=")


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, 15)
    server.wait(timeout=60)


class _Load:
    """`threads` clients, each on its own keep-alive connection, posting `body` until stopped;
    every answer's status, the version it names, and its latency."""

    def __init__(self, port: int, body: bytes, threads: int):
        self.port, self.body, self.stopped = port, body, threading.Event()
        self.answers: list[tuple[float, int, object, float]] = []  # (time, status, version, s)
        self.workers = [threading.Thread(target=self._client) for _ in range(threads)]

    def _client(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        while not self.stopped.is_set():
            start = time.perf_counter()
            try:
                connection.request("POST", "/invocations", self.body, headers)
                answer = connection.getresponse()
                status, payload = answer.status, answer.read()
            except OSError:
                connection.close()
                status, payload = 0, b"{}"
            took = time.perf_counter() - start
            version = json.loads(payload).get("model", {}).get("version") if status == 200 else None
            self.answers.append((time.monotonic(), status, version, took))

    def run(self, seconds: float) -> list:
        for worker in self.workers:
            worker.start()
        time.sleep(seconds)
        self.stopped.set()
        for worker in self.workers:
            worker.join()
        return self.answers


def _throughput(port: int, body: bytes, threads: int, seconds: float) -> dict:
    _Load(port, body, threads).run(min(1.0, seconds))  # warm-up: connections, first batches
    answers = _Load(port, body, threads).run(seconds)
    ok = sorted(took for _, status, _, took in answers if status == 200)
    return {
        "images_per_s": round(len(ok) / seconds, 1),
        "failed": len(answers) - len(ok),
        "p50_ms": round(1000 * ok[len(ok) // 2], 2),
        "p99_ms": round(1000 * ok[min(len(ok) - 1, int(len(ok) * 0.99))], 2),
    }


def _servers() -> dict[str, list[str]]:
    """Each server's command, less the port."""
    model = f"models:/{NAME}@champion"
    local = ["--env-manager", "local", "-h", "127.0.0.1", "-p"]
    return {
        "mlflow models serve": [str(BIN / "mlflow"), "models", "serve", "-m", model, *local],
        "pipeline serve": [str(BIN / "pipeline"), "serve", "--port"],
        "pipeline serve --workers 2": [str(BIN / "pipeline"), "serve", "--workers", "2", "--port"],
        "pipeline serve, no prediction log": [
            *(str(BIN / "pipeline"), "serve", "--set", "monitor.log=false", "--port"),
        ],
    }


def http_load(body: bytes, seconds: float, bare_batch_256: float) -> dict:
    """images/s and latency of both servers at 1, 8 and 32 client threads."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ROOT}/.mlflow/mlflow.db"}
    table = {}
    for name, command in _servers().items():
        port = _free_port()
        server = _start([*command, str(port)], port, env)
        try:
            table[name] = {
                f"concurrency_{n}": _throughput(port, body, n, seconds) for n in (1, 8, 32)
            }
        finally:
            _stop(server)
    ours, theirs = table["pipeline serve"], table["mlflow models serve"]
    two = table["pipeline serve --workers 2"]["concurrency_32"]["images_per_s"]
    unlogged = table["pipeline serve, no prediction log"]["concurrency_32"]["images_per_s"]
    table["ratios"] = {
        "log_on_over_off_at_32": round(ours["concurrency_32"]["images_per_s"] / unlogged, 3),
        "two_workers_over_one_at_32": round(two / ours["concurrency_32"]["images_per_s"], 2),
        "two_workers_at_32_over_bare_batch_256": round(two / bare_batch_256, 3),
        "pipeline_over_mlflow_at_32": round(
            ours["concurrency_32"]["images_per_s"] / theirs["concurrency_32"]["images_per_s"], 2
        ),
        "p99_at_1_minus_mlflow_ms": round(
            ours["concurrency_1"]["p99_ms"] - theirs["concurrency_1"]["p99_ms"], 2
        ),
        "served_at_32_over_bare_batch_256": round(
            ours["concurrency_32"]["images_per_s"] / bare_batch_256, 3
        ),
    }
    return table


def log_pairs(body: bytes, seconds: float, pairs: int) -> dict:
    """`pipeline serve` with the prediction log, then without, `pairs` times in turn, at 32
    client threads: each cell, and images/s with the log over without, summed over the pairs
    (alternating cancels the machine's drift, which is larger than the log's cost)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ROOT}/.mlflow/mlflow.db"}
    command = [str(BIN / "pipeline"), "serve"]
    cells: dict[str, list] = {"on": [], "off": []}
    for _ in range(pairs):
        for name, extra in (("on", []), ("off", ["--set", "monitor.log=false"])):
            port = _free_port()
            server = _start([*command, *extra, "--port", str(port)], port, env)
            try:
                cells[name].append(_throughput(port, body, 32, seconds))
            finally:
                _stop(server)
    total = {name: sum(cell["images_per_s"] for cell in runs) for name, runs in cells.items()}
    return {**cells, "on_over_off": round(total["on"] / total["off"], 3)}


def alias_flip(body: bytes, seconds: float) -> dict:
    """Failed requests and the time to the new version when the champion moves under load at
    8 threads, in a copy of the registry (the project's own is left as it is)."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(ROOT / ".mlflow" / "mlflow.db", Path(tmp) / "mlflow.db")
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = MlflowClient(uri, uri)
        old = client.get_model_version_by_alias(NAME, "champion")
        new = client.create_model_version(NAME, old.source, old.run_id, tags=old.tags)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        port = _free_port()
        command = [str(BIN / "pipeline"), "serve", "--set", "serve.poll_s=0.5", "--port"]
        server = _start([*command, str(port)], port, env)
        try:
            load = _Load(port, body, 8)
            runner = threading.Thread(target=load.run, args=(seconds * 2 + 5,))
            runner.start()
            time.sleep(seconds)
            moved = time.monotonic()
            client.set_registered_model_alias(NAME, "champion", new.version)
            runner.join()
        finally:
            _stop(server)
    first_new = min(t for t, _, v, _ in load.answers if v == int(new.version))
    return {
        "requests": len(load.answers),
        "failed": sum(status != 200 for _, status, _, _ in load.answers),
        "seconds_to_new_version": round(first_new - moved, 2),
        "poll_s": 0.5,
    }


def main(repeats: int, images: int, seconds: float, pairs: int = 0) -> dict:
    import mlflow
    import torch
    from mlflow import MlflowClient

    from pipeline.tracking.weights import load_weights, png_base64

    mlflow.set_tracking_uri(
        os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT}/.mlflow/mlflow.db")
    )
    version = MlflowClient().get_model_version_by_alias("image-classifier", "champion")
    net, spec = load_weights(version.run_id)
    served = mlflow.pyfunc.load_model(f"models:/image-classifier/{version.version}")
    pixels = np.load(ROOT / "data" / "test_images.npy")[:images]
    files = np.array([png_base64(image) for image in pixels], dtype=object)

    @torch.no_grad()
    def bare(batch: np.ndarray):
        return net(torch.from_numpy(batch.astype(np.float32)))

    table = {}
    for size in (1, 256):
        cut = [slice(i, i + size) for i in range(0, len(pixels), size)]
        if size == 1:
            cut = cut[:128]  # batch 1: 128 calls are plenty for a median
        arrays, encoded = [pixels[c] for c in cut], [files[c] for c in cut]
        base = _per_image_us(bare, arrays, repeats)
        table[f"batch_{size}"] = {
            "bare_network_us": round(base, 1),
            "pyfunc_uint8_us": round(_per_image_us(served.predict, arrays, repeats), 1),
            "pyfunc_png_files_us": round(_per_image_us(served.predict, encoded, repeats), 1),
        }
        row = table[f"batch_{size}"]
        row["uint8_over_bare"] = round(row["pyfunc_uint8_us"] / base, 2)
        row["files_over_bare"] = round(row["pyfunc_png_files_us"] / base, 2)
    bare_256 = 1e6 / table["batch_256"]["bare_network_us"]
    body = json.dumps({"inputs": [files[0]]}).encode()
    result = {
        "model": f"image-classifier/{version.version}",
        "input_shape": list(spec.shape),
        "images": len(pixels),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        **table,
        "http": http_load(body, seconds, bare_256),
        "alias_flip": alias_flip(body, seconds),
    }
    if pairs:
        result["prediction_log_pairs"] = log_pairs(body, seconds, pairs)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=256 * 4)
    parser.add_argument("--seconds", type=float, default=5.0, help="per HTTP load cell")
    parser.add_argument(
        "--pairs", type=int, default=0, help="alternating runs with and without the log"
    )
    args = parser.parse_args()
    print(json.dumps(main(args.repeats, args.images, args.seconds, args.pairs), indent=2))
