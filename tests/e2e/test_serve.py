"""`pipeline serve` through HTTP, as clients, load balancers and Prometheus meet it: the payloads
`mlflow models serve` takes answered alike, the refusals of `pipeline predict`, metrics that
move, the alias followed under load with no failed request, and hostile requests refused in
one line while good ones keep being answered."""

from __future__ import annotations

import json
import pathlib
import socket
import threading
import time
import urllib.request

import numpy as np
import psutil
import pytest
import yaml

from pipeline.tracking.weights import png_base64
from tests.conftest import run
from tests.e2e.live import MlflowServer, PipelineServer, ServedModel

pytestmark = pytest.mark.slow
NAME = "image-classifier"


def _png(pixels: np.ndarray) -> str:
    """One H x W grayscale image as a client sends it (the project's `png_base64`)."""
    return png_base64(pixels[None])


def _post(url: str, body: bytes, content_type="application/json"):
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _refusal(project, array) -> str:
    """What `pipeline predict` says of `array` saved as an .npy (after the file's name)."""
    np.save(project / "bad.npy", array)
    args = ["--model", NAME, "--input", str(project / "bad.npy"), "--output", "x.csv"]
    result = run(["pipeline", "predict", *args], project, check=False)
    assert result.returncode == 1
    return result.stderr.strip().removeprefix(f"data error: {project / 'bad.npy'} ")


def test_serve_answers_mlflows_payloads_alike_refuses_as_predict_and_counts(from_template):
    project = from_template("registered")
    said = run(["pipeline", "serve", "--model", f"{NAME}/1"], project, check=False)
    assert said.returncode == 2 and "give NAME@ALIAS" in said.stderr
    said = run(["pipeline", "serve", "--model", f"{NAME}@nosuch"], project, check=False)
    assert said.returncode == 1 and said.stderr.strip() == (
        f"error: {NAME} has no alias @nosuch; its aliases: @challenger, @champion"
    )

    pixels = np.load(project / "data" / "test_images.npy")[:6]
    files = [_png(image[0]) for image in pixels]
    bodies = {
        "inputs pixels": json.dumps({"inputs": pixels.tolist()}),
        "instances pixels": json.dumps({"instances": pixels.tolist()}),
        "inputs files": json.dumps({"inputs": files}),
        "dataframe_split": json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[f] for f in files]}}
        ),
        "dataframe_records": json.dumps({"dataframe_records": [{"image": f} for f in files]}),
        "csv": "image\n" + "\n".join(files) + "\n",
    }
    run_id = json.loads((project / "outputs" / "train.json").read_text())["run_id"]
    md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    with (
        PipelineServer(project) as ours,
        ServedModel(project, f"models:/{NAME}@champion") as theirs,
    ):
        assert ours.get("/health") == {"status": "alive"}
        assert ours.get("/ready") == {"status": "ready", "version": 1}
        version = ours.get("/version")
        assert (version["name"], version["version"], version["alias"]) == (NAME, 1, "champion")
        assert (version["run_id"], version["data_md5"]) == (run_id, md5)

        for what, body in bodies.items():
            kind = "text/csv" if what == "csv" else "application/json"
            status, answer, headers = ours.post(body.encode(), kind)
            # MLflow's scoring server fails to parse CSV against this model's tensor schema
            # ("TensorSpec only supports numpy types"): ours reads it, as the same files.
            same = bodies["inputs files"] if what == "csv" else body
            expected_status, expected = _post(theirs.url, same.encode())
            assert (status, expected_status) == (200, 200), (what, answer)
            assert answer["model"] == {"name": NAME, "version": 1}
            assert headers["X-Model-Version"] == f"{NAME}/1"
            got, want = answer["predictions"], expected["predictions"]
            assert [r["prediction"] for r in got] == [r["prediction"] for r in want], what
            assert np.allclose(
                [[r[k] for k in sorted(r) if k.startswith("p_")] for r in got],
                [[r[k] for k in sorted(r) if k.startswith("p_")] for r in want],
                atol=1e-6,
            ), what

        # Calibrated: softmax(logits / T) of the run's own network, T fitted by evaluate, from
        # both servers (compared above) and from pipeline predict.
        status, answer, _ = ours.post(bodies["inputs pixels"].encode())
        served = np.array([[row[f"p_{k}"] for k in range(10)] for row in answer["predictions"]])
        assert np.allclose(served, _calibrated(project, run_id, pixels), atol=1e-5)
        np.save(project / "six.npy", pixels)
        inside_a_file = project / "six.npy" / "six.csv"  # fails before scoring: nothing logged
        predict = ["pipeline", "predict", "--input", str(project / "six.npy"), "--output"]
        failed = run([*predict, str(inside_a_file)], project, check=False)
        assert failed.returncode == 1 and "cannot make its folder" in failed.stderr
        out = project / "six.csv"
        run(
            ["pipeline", "predict", "--input", str(project / "six.npy"), "--output", str(out)],
            project,
        )
        predicted = np.loadtxt(out, delimiter=",", skiprows=1, usecols=range(3, 13))
        assert np.allclose(predicted, served, atol=1e-5)

        for bad in (pixels[:3] / 255.0, np.where(pixels[:3] > 100, np.nan, pixels[:3])):
            predict_said = _refusal(project, bad)
            status, answer, _ = ours.post(json.dumps({"inputs": bad.tolist()}).encode())
            assert status == 400 and answer["message"] == f"the input {predict_said}"

        sent = len(bodies) + 1
        assert ours.metric("pipeline_serve_requests_total", outcome="ok") == sent
        assert ours.metric("pipeline_serve_images_total", outcome="ok") == 6 * sent
        assert ours.metric("pipeline_serve_calibration_temperature") == version["temperature"]
        assert ours.metric("pipeline_serve_refusals_total", reason="contract") == 2
        assert ours.metric("pipeline_serve_model_version") == 1
        counted = sum(
            ours.metric("pipeline_serve_predictions_total", version="1", cls=str(k))
            for k in range(10)
        )
        assert counted == 6 * sent
        assert ours.metric("pipeline_serve_batch_images_count") >= sent
        logged = 6 * sent + 2  # each image, and each refusal
        deadline = time.monotonic() + 30  # the log writes every few seconds, off the answers
        while ours.metric("pipeline_serve_logged_rows_total", outcome="written") < logged:
            assert time.monotonic() < deadline, ours.get("/metrics")
            time.sleep(0.5)

    # The prediction log: every image served and scored by pipeline predict, and the refusals
    from pipeline.monitoring.log import ParquetStore

    rows = ParquetStore(project / "outputs" / "monitor" / "predictions").read().to_pylist()
    rows.sort(key=lambda row: row["time"])  # stable: a batch's rows share their time
    served_rows = [r for r in rows if r["source"] == "serve"]
    assert len(served_rows) == logged
    assert [r["refused"] for r in served_rows if r["refused"]] == ["contract", "contract"]
    assert {(r["model"], r["version"]) for r in served_rows} == {(NAME, 1)}
    last = [r for r in served_rows if r["refused"] is None][-6:]  # the inputs pixels, again
    assert np.allclose([r["probabilities"] for r in last], served, atol=1e-5)
    assert np.allclose([r["mean"][0] for r in last], pixels.reshape(6, -1).mean(1), atol=1e-3)
    scored = [r for r in rows if r["source"] == "predict"]
    assert [r["input"] for r in scored] == [f"six.npy[{k}]" for k in range(6)]
    assert np.allclose([r["probabilities"] for r in scored], served, atol=1e-5)
    assert [r["prediction"] for r in scored] == [str(k) for k in served.argmax(1)]


def _calibrated(project, run_id: str, pixels: np.ndarray) -> np.ndarray:
    """softmax(logits / T) of the run's network, read from its artifacts on disk; T from the
    run's calibration.json, which must have lowered the test split's calibration error."""
    import pyarrow.parquet
    import torch

    from pipeline.tracking.weights import read_weights
    from pipeline.training.calibration import softmax

    artifacts = next((project / ".mlflow" / "artifacts").glob(f"*/{run_id}/artifacts"))
    record = json.loads((artifacts / "calibration.json").read_text())
    assert record["fitted_on"].startswith("the validation split")
    assert record["after"]["ece"] < record["before"]["ece"]
    assert (artifacts / "plots" / "reliability.png").stat().st_size > 10_000
    card = (artifacts / "model_card.md").read_text()
    assert f"softmax(logits / {record['temperature']:.4f})" in card
    net, _ = read_weights(artifacts / "weights" / "model.pt")
    with torch.no_grad():
        logits = net(torch.from_numpy(pixels.astype(np.float32))).numpy()
    calibrated = softmax(logits, record["temperature"])
    # monitoring's reference: prediction-log rows of the run's test and validation splits
    reference = pyarrow.parquet.read_table(artifacts / "monitor" / "reference.parquet")
    rows = reference.to_pylist()
    test = [r for r in rows if r["source"] == "test"]
    assert len(test) == len(np.load(project / "data" / "test_images.npy"))
    assert np.allclose([r["probabilities"] for r in test[: len(pixels)]], calibrated, atol=1e-5)
    assert 0 < sum(r["source"] == "validation" for r in rows) < len(test)
    return calibrated


def test_serve_follows_the_alias_under_load_without_a_failed_request(from_template):
    project = from_template("registered")
    image = json.dumps({"inputs": [_png(np.full((8, 8), 120, np.uint8))]}).encode()
    seen: list[list[tuple[int, int | None]]] = [[] for _ in range(3)]
    stop = threading.Event()

    def load(out: list) -> None:
        while not stop.is_set():
            status, answer, _ = server.post(image)
            out.append((status, answer.get("model", {}).get("version")))

    with PipelineServer(project, "--set", "serve.poll_s=0.5") as server:
        workers = [threading.Thread(target=load, args=(out,)) for out in seen]
        for worker in workers:
            worker.start()
        try:
            for command in (
                ["train", "--set", "train.epochs=1"],
                ["evaluate"],
                ["register", "--set", "register.floor=0", "--set", "register.min_improvement=1"],
                ["promote", f"{NAME}/2", "--force", "--reason", "serve test"],
            ):
                run(["pipeline", *command], project)
            _wait_for_version(server, 2)
            time.sleep(1)
            run(["pipeline", "rollback", NAME, "--reason", "serve test"], project)
            _wait_for_version(server, 1)
            time.sleep(1)
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert server.metric("pipeline_serve_switches_total") == 2
        assert server.metric("pipeline_serve_follow_failures_total") == 0

    answers = [a for out in seen for a in out]
    assert len(answers) > 100 and {status for status, _ in answers} == {200}
    for out in seen:  # each client saw 1, then 2 from one answer on, then 1 again
        versions = [v for _, v in out]
        changes = [b for a, b in zip(versions, versions[1:], strict=False) if a != b]
        assert versions[0] == 1 and changes == [2, 1], changes


def _wait_for_version(server: PipelineServer, version: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while server.get("/version")["version"] != version:
        assert time.monotonic() < deadline, f"still serving {server.get('/version')}"
        time.sleep(0.2)


def test_serve_refuses_hostile_requests_in_one_line_and_keeps_answering(from_template):
    project = from_template("registered")
    limits = ["serve.max_body_mb=4", "serve.max_images=64", "serve.header_timeout_s=2"]
    limits += ["serve.body_timeout_s=3", "serve.max_in_flight=3"]
    good = json.dumps({"inputs": [_png(np.full((8, 8), 200, np.uint8))]}).encode()
    bomb = _png(np.zeros((6000, 6000), np.uint8))  # 36 MP: over the served 16.7 MP, 35 KB
    hostile = {
        "a 36-megapixel PNG": (
            json.dumps({"inputs": [bomb]}).encode(),
            400,
            "PIPELINE_SERVE_MAX_PIXELS",
        ),
        "a 5 MiB body": (b'{"inputs": ["' + b"A" * 5 * 2**20 + b'"]}', 413, "max_body_mb"),
        "65 images": (
            json.dumps({"inputs": [_png(np.zeros((8, 8), np.uint8))] * 65}).encode(),
            413,
            "max_images",
        ),
        "JSON nested 100,000 deep": (b'{"inputs": ' + b"[" * 10**5 + b"]" * 10**5 + b"}", 400, ""),
        "a 5,000-digit integer": (b'{"inputs": [[[[' + b"9" * 5000 + b"]]]]}", 400, "digits"),
        "3 MB of zeros": (b'{"inputs": [' + b"0," * 1_500_000 + b"0]}", 413, "values"),
        "not base64": (json.dumps({"inputs": ["%%%"]}).encode(), 400, "base64"),
        "a single number": (b'{"inputs": 5}', 400, "shape"),
        "no format key": (b'{"rows": [1]}', 400, "inputs"),
        "a key echoing itself": (b'{"SECRET' + b"A" * 10**5 + b'": 1}', 400, "1 keys"),
    }
    failures: list = []
    stop = threading.Event()
    with PipelineServer(project, *(a for limit in limits for a in ("--set", limit))) as server:
        process = psutil.Process(server.proc.pid)
        idle = process.memory_info().rss
        peak = [idle]

        def good_requests() -> None:
            while not stop.is_set():
                status, answer, _ = server.post(good)
                if status != 200:
                    failures.append((status, answer))
                peak[0] = max(peak[0], process.memory_info().rss)

        keeper = threading.Thread(target=good_requests)
        keeper.start()
        try:
            for what, (body, status, words) in hostile.items():
                got, answer, _ = server.post(body)
                message = answer["message"]
                assert got == status and words in message, (what, got, message)
                assert "\n" not in message and len(message) < 300, what
            _connections_that_stall_are_closed(server.url)
        finally:
            stop.set()
            keeper.join()
        _busy_and_gone_clients_are_counted(server)
        assert server.metric("pipeline_serve_refusals_total", reason="too_large") == 1
        assert server.metric("pipeline_serve_refusals_total", reason="too_many_images") == 1
        assert server.metric("pipeline_serve_refusals_total", reason="too_many_values") == 1
        assert server.metric("pipeline_serve_refusals_total", reason="body_timeout") == 3
        log = server.log.read_text()
        assert "Traceback" not in log and "SECRET" not in log
    assert failures == []
    assert peak[0] - idle < 300 * 2**20, f"{(peak[0] - idle) / 2**20:.0f} MiB over idle"


def _connections_that_stall_are_closed(url: str) -> None:
    """An idle connection and a slow request head are closed after serve.header_timeout_s
    (2 s), endless headers past 64 KiB; a body that stops arriving is answered 408 after
    serve.body_timeout_s (3 s)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as idle:
        assert idle.recv(100) == b""  # closed by the server, not the 20 s timeout
    with socket.create_connection((host, int(port)), timeout=20) as slow:
        slow.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
        with pytest.raises(OSError):
            for _ in range(40):
                time.sleep(0.5)
                slow.sendall(b"X-Slow: 1\r\n")
    with socket.create_connection((host, int(port)), timeout=20) as endless:
        endless.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        with pytest.raises(OSError):  # closed past 64 KiB of headers, long before the deadline
            for _ in range(1000):  # paced: loopback buffers could take 1 MB unread
                endless.sendall(b"X-Big: " + b"a" * 1000 + b"\r\n")
                time.sleep(0.002)
    with _partial_body(url) as partial:
        assert partial.recv(200).startswith(b"HTTP/1.1 408 ")


def _partial_body(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=20)
    connection.sendall(
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    return connection


def _busy_and_gone_clients_are_counted(server: PipelineServer) -> None:
    """Past serve.max_in_flight (3) requests in progress, /invocations answers 503 in MLflow's
    shape while the probes answer; a client that leaves mid-body is counted, not a traceback;
    unknown routes are MLflow-shaped 404s."""
    stalled = [_partial_body(server.url) for _ in range(3)]
    time.sleep(0.5)
    status, answer, _ = server.post(b'{"inputs": []}')
    assert (status, answer["error_code"]) == (503, "SERVICE_UNAVAILABLE")
    assert server.get("/health") == {"status": "alive"} and server.get("/ready")["version"] == 1
    head = urllib.request.Request(f"{server.url}/health", method="HEAD")
    assert urllib.request.urlopen(head, timeout=10).status == 200
    stalled.pop().close()  # gone mid-body
    for connection in stalled:
        assert connection.recv(200).startswith(b"HTTP/1.1 408 ")
        connection.close()
    assert server.metric("pipeline_serve_requests_total", outcome="busy") == 1
    assert server.metric("pipeline_serve_requests_total", outcome="disconnected") == 1
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{server.url}/nowhere", timeout=10)
    assert missing.value.code == 404
    assert json.loads(missing.value.read())["error_code"] == "NOT_FOUND"


def test_serve_abstains_where_the_held_out_scores_say_and_refuses_without_them(from_template):
    import torch

    from pipeline.tracking.weights import read_weights
    from pipeline.training.calibration import softmax
    from pipeline.training.conformal import Abstainer

    project = from_template("registered")
    run_id = json.loads((project / "outputs" / "train.json").read_text())["run_id"]
    scored = json.loads((project / "reports" / "metrics.json").read_text())
    assert scored["test_set_coverage"] >= 0.95 - 3 * (0.05 * 0.95 / 359) ** 0.5  # 1 - alpha, 3 sd
    artifacts = next((project / ".mlflow" / "artifacts").glob(f"*/{run_id}/artifacts"))
    t = json.loads((artifacts / "calibration.json").read_text())["temperature"]
    with np.load(artifacts / "conformal.npz") as held:
        abstainer = Abstainer({k: held[k] for k in held.files}, alpha=0.1, ood_rate=0.05)
    pixels = np.concatenate(
        [np.load(project / "data" / "test_images.npy")[:40], np.full((2, 1, 8, 8), 255, np.uint8)]
    )
    net, _ = read_weights(artifacts / "weights" / "model.pt")
    with torch.no_grad():
        logits = net(torch.from_numpy(pixels.astype(np.float32))).numpy()
    sets, reasons = abstainer.decide(logits, softmax(logits, t), t)

    limits = ["serve.abstain=true", "serve.alpha=0.1", "serve.ood_rate=0.05"]
    with PipelineServer(project, *(a for limit in limits for a in ("--set", limit))) as server:
        assert server.get("/version")["abstain"] == {
            "alpha": 0.1,
            "ood_rate": 0.05,
            "held_out_images": len(abstainer.scores["energy"]),
        }
        status, answer, _ = server.post(json.dumps({"inputs": pixels.tolist()}).encode())
        assert status == 200
        rows = answer["predictions"]
        classes = [str(k) for k in range(10)]
        assert [r["abstained"] for r in rows] == reasons
        assert [r["set"] for r in rows] == [
            [c for c, k in zip(classes, s, strict=True) if k] for s in sets
        ]
        assert [r["prediction"] == "unknown" for r in rows] == [r is not None for r in reasons]
        assert 0 < reasons.count(None) < len(rows)  # some answered, some not: both paths ran
        for why in set(filter(None, reasons)):
            assert server.metric("pipeline_serve_unknown_total", reason=why) == reasons.count(why)

    (artifacts / "conformal.npz").unlink()  # a version evaluated before the held-out scores
    for workers in ("1", "2"):  # each worker fails to load it: the server stops, not retries
        args = ["--port", "1", "--set", limits[0], "--workers", workers]
        said = run(["pipeline", "serve", *args], project, check=False)
        assert said.returncode == 1
        assert "has no held-out scores to abstain by" in said.stderr


def _versions(server: PipelineServer) -> dict[str, float]:
    """The version each worker process answers with: pid -> version (/metrics)."""
    prefix = "pipeline_serve_model_version{pid="
    lines = server.get("/metrics").splitlines()
    return {
        line[len(prefix) + 1 :].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(prefix)
    }


def _until(condition, what, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, what()
        time.sleep(0.2)
    return found


def test_serve_workers_follow_a_tracking_servers_webhook_at_once(from_template):
    """The project's registry behind `mlflow server`, which sends alias webhooks (over http to
    a local address, as MLFLOW_WEBHOOK_ALLOWED_SCHEMES and ..._ALLOW_PRIVATE_IPS allow), served
    by two worker processes on one port: with polling once an hour, a promotion reaches both
    through the webhook that one of them takes; a forged delivery is refused; /metrics sums
    both; a worker killed is replaced, on the alias's version, or while that version cannot be
    loaded, on the one the others serve; SIGTERM stops them all (143) and removes their metrics
    folder; SIGKILL to the supervisor takes its workers too."""
    project = from_template("registered")
    first = json.loads((project / "outputs" / "train.json").read_text())["run_id"]
    weights = next((project / ".mlflow" / "artifacts").glob(f"*/{first}/artifacts/weights/*.pt"))
    intact = weights.read_bytes()
    sends = {
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",  # a test has no certificate
        "PIPELINE_SERVE_WEBHOOK_SECRET": "s3cret",
    }
    store = f"sqlite:///{project}/.mlflow/mlflow.db"
    image = json.dumps({"inputs": [np.zeros((8, 8), np.uint8).tolist()]}).encode()
    with MlflowServer(project, store, env=sends) as tracking:
        env = {**tracking.env, "MLFLOW_TRACKING_URI": tracking.url}
        args = ["--set", "serve.poll_s=3600", "--webhook-url", "{url}/webhook", "--workers", "2"]
        with PipelineServer(project, *args, env=env) as server:
            _until(lambda: len(_versions(server)) == 2, lambda: _versions(server))
            assert set(_versions(server).values()) == {1.0}  # each serving from its first gauge
            forged = urllib.request.Request(
                f"{server.url}/webhook", b"{}", {"Content-Type": "application/json"}
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(forged, timeout=10)
            assert refused.value.code == 401
            for command in (
                ["train", "--set", "train.epochs=1"],
                ["evaluate"],
                ["register", "--set", "register.floor=0", "--set", "register.min_improvement=1"],
                ["promote", f"{NAME}/2", "--force", "--reason", "webhook test"],
            ):
                run(["pipeline", *command], project, env=env)
            # polling would take an hour: each worker took the move from the one webhook
            _until(lambda: set(_versions(server).values()) == {2.0}, lambda: _versions(server))
            assert server.log.read_text().count("moved: version 1 -> 2") == 2
            assert server.metric("pipeline_serve_webhooks_total", outcome="taken") == 1

            answers = [server.post(image) for _ in range(12)]
            assert {(s, a["model"]["version"]) for s, a, _ in answers} == {(200, 2)}
            assert server.metric("pipeline_serve_requests_total", outcome="ok") == 12

            workers = psutil.Process(server.proc.pid).children()
            served = [w for w in workers if str(w.pid) in _versions(server)]
            shared = served[0].environ()["PROMETHEUS_MULTIPROC_DIR"]
            served[0].kill()
            _until(
                lambda: str(served[0].pid) not in _versions(server) and len(_versions(server)) == 2,
                lambda: _versions(server),
            )
            assert set(_versions(server).values()) == {2.0}  # the replacement: the alias's
            assert server.post(image)[0] == 200
            assert server.metric("pipeline_serve_requests_total", outcome="ok") == 13

            weights.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))  # v1 no longer loads
            run(
                ["pipeline", "rollback", NAME, "--reason", "to a damaged version"], project, env=env
            )
            _until(
                lambda: server.log.read_text().count("@champion: still on version 2") >= 2,
                lambda: server.log.read_text()[-3000:],
            )
            workers = [w for w in psutil.Process(server.proc.pid).children()]
            served = [w for w in workers if str(w.pid) in _versions(server)]
            served[0].kill()
            _until(
                lambda: str(served[0].pid) not in _versions(server) and len(_versions(server)) == 2,
                lambda: _versions(server),
            )
            assert set(_versions(server).values()) == {2.0}
            assert "serving version 2, as the other workers do" in server.log.read_text()
            status, answer, _ = server.post(image)
            assert (status, answer["model"]["version"]) == (200, 2)

            served = [w for w in psutil.Process(server.proc.pid).children() if w.is_running()]
            server.proc.terminate()  # the parent only: it stops its workers
            assert server.proc.wait(60) == 143
            assert not psutil.wait_procs(served, timeout=30)[1]  # workers, resource tracker
            assert not pathlib.Path(shared).exists()
    weights.write_bytes(intact)
    with PipelineServer(project, "--workers", "2") as server:  # champion: v1 again
        _until(lambda: len(_versions(server)) == 2, lambda: _versions(server))
        workers = psutil.Process(server.proc.pid).children()
        server.proc.kill()
        server.proc.wait(10)
        assert not psutil.wait_procs(workers, timeout=60)[1]  # none left serving, unsupervised
    local = run(["pipeline", "serve", "--webhook-url", "http://x/webhook"], project, check=False)
    assert (
        local.returncode == 2 and "webhooks are sent by an MLflow tracking server" in local.stderr
    )
    said = run(["pipeline", "serve", "--workers", "0"], project, check=False)
    assert said.returncode == 2 and "serve.workers" in said.stderr


def _shadow_counts(server: PipelineServer, images: int, seconds: float = 60) -> dict:
    """The shadow's per-outcome image counts once it has taken `images` in all."""
    outcomes = ("agree", "disagree", "unscored", "dropped")
    deadline = time.monotonic() + seconds
    while True:
        counts = {
            o: server.metric("pipeline_serve_shadow_images_total", outcome=o) for o in outcomes
        }
        if sum(counts.values()) >= images or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def test_serve_shadows_another_alias_counting_agreement_without_touching_the_answers(
    from_template,
):
    """`--shadow challenger` scores every request with the challenger too: the answers stay the
    champion's, and the agree/disagree counts are those of `pipeline predict` run with each."""
    project = from_template("registered")  # version 1: champion and challenger
    said = run(["pipeline", "serve", "--shadow", "champion"], project, check=False)
    assert said.returncode == 2 and "give another alias of image-classifier" in said.stderr
    pixels = np.random.default_rng(0).integers(0, 256, (24, 8, 8), dtype=np.uint8)
    body = json.dumps({"inputs": pixels.tolist()}).encode()
    with PipelineServer(project, "--shadow", "challenger", "--set", "serve.poll_s=0.5") as server:
        deadline = time.monotonic() + 60
        while server.get("/version")["shadow"]["version"] != 1:
            assert time.monotonic() < deadline, server.get("/version")
            time.sleep(0.2)
        status, answer, _ = server.post(body)
        assert status == 200 and answer["model"]["version"] == 1
        itself = {"agree": 24, "disagree": 0, "unscored": 0, "dropped": 0}
        assert _shadow_counts(server, 24) == itself  # version 1 against itself: all agree

        for command in (
            ["train", "--set", "train.epochs=1"],
            ["evaluate"],
            ["register", "--set", "register.floor=0", "--set", "register.min_improvement=1"],
        ):
            run(["pipeline", *command], project)  # version 2: challenger only
        deadline = time.monotonic() + 60
        while server.get("/version")["shadow"]["version"] != 2:
            assert time.monotonic() < deadline, server.get("/version")
            time.sleep(0.2)
        status, answer, headers = server.post(body)
        assert status == 200 and headers["X-Model-Version"] == f"{NAME}/1"
        counts = _shadow_counts(server, 48)
        assert server.metric("pipeline_serve_shadow_version") == 2

    np.save(project / "shadowed.npy", pixels)
    predicted = {}
    for version in (1, 2):
        out = project / f"v{version}.json"
        args = ["--model", f"{NAME}/{version}", "--input", str(project / "shadowed.npy")]
        run(["pipeline", "predict", *args, "--output", str(out)], project)
        rows = json.loads(out.read_text())["predictions"]
        predicted[version] = [row["prediction"] for row in rows]
    assert [row["prediction"] for row in answer["predictions"]] == predicted[1]
    agree = sum(a == b for a, b in zip(predicted[1], predicted[2], strict=True))
    assert counts == {"agree": 24 + agree, "disagree": 24 - agree, "unscored": 0, "dropped": 0}
