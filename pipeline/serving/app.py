"""The HTTP app of `pipeline serve` (FastAPI on uvicorn).

Routes: `/invocations` (MLflow's scoring protocol, through the model's input contract; the
answer's `model` and the `X-Model-Version` header name the version that scored it),
`/health` (alive; `/ping` as MLflow has it), `/ready` (a version is loaded and answered its
warm-up), `/version`, `/metrics` (Prometheus). Limits: `ServeConfig` (docs/serving.md).
With `serve.workers` > 1, uvicorn's supervisor runs that many worker processes on one socket
(each with its model, batcher, followers and limits); see `run`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import uvicorn
import uvicorn.supervisors
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pipeline.config import MonitorConfig, ServeConfig
from pipeline.serving import webhook
from pipeline.serving.batcher import Batcher
from pipeline.serving.metrics import Metrics, exposition
from pipeline.serving.model import Follower, Served, load
from pipeline.serving.payload import Refused, check_headers, count, model_input
from pipeline.serving.shadow import Shadow
from pipeline.settings import Settings

log = logging.getLogger("pipeline.serve")
MB = 1024 * 1024
# Bodies up to this size are decoded on the event loop: a thread hop and the lock handoffs
# between threads cost more than decoding a few small images.
INLINE_BYTES = 64 * 1024
WEBHOOK_BYTES = 64 * 1024  # an alias event is a few hundred bytes
SERVING = "serving"  # in the workers' folder: the version the last worker to switch serves
READY_S = 120  # a worker's time to load and warm up before uvicorn's supervisor gives up on it


@dataclass(frozen=True)
class Job:
    """What a server serves, and how: `target` (name, alias) under `cfg`'s limits; `shadow`, an
    alias that scores each request too, off the response path (`serving.shadow`); `monitor`,
    the prediction log's config (None: no log). Pickled whole to each worker process."""

    settings: Settings
    cfg: ServeConfig
    target: tuple[str, str]
    shadow: str = ""
    monitor: MonitorConfig | None = None


class State:
    """What the routes share: the version answering now, the batcher and the metrics.
    `shared`: the folder of the server's worker processes (metrics, nudges); None: the only
    process."""

    def __init__(self, job: Job, shared: str | None = None):
        self.settings, self.cfg, (self.name, self.alias) = job.settings, job.cfg, job.target
        self.shared = shared
        cfg = job.cfg
        self.metrics = Metrics(cfg.max_batch, shadow=bool(job.shadow))
        self.log = None  # the prediction log (pipeline.monitoring)
        if job.monitor is not None:
            from pipeline.monitoring.log import open_log

            counted = self.metrics.logged.labels
            self.log = open_log(job.settings, job.monitor, lambda o, n: counted(o).inc(n))
        self.shadow = Shadow(job.shadow, self.metrics) if job.shadow else None
        self.batcher = Batcher(cfg.max_batch, cfg.max_wait_ms / 1000, self.metrics.batch.observe)
        self.served: Served | None = None
        self.failure: str | None = None  # why the first load failed: the server then stops
        self.in_flight = 0  # /invocations requests being read, decoded or scored

    def switch(self, served: Served) -> None:
        """Answer with `served` from the next request on (requests already decoding finish
        with the version they started with). With workers, the version is written to the
        workers' folder, where a replacement worker finds it (`_WorkerConfig`)."""
        if self.served is not None:
            self.metrics.switches.inc()
        self.served = served
        if self.shared is not None:
            Path(self.shared, SERVING).write_text(str(served.version))
        self.metrics.version.set(served.version)
        self.metrics.temperature.set(served.temperature)


def create_app(job: Job, shared: str | None = None, first: Served | None = None) -> FastAPI:
    """The app serving `job` (`shared`: as `State` takes it); `first`: the version already
    loaded, else it loads in the background while `/ready` says 503."""
    state = State(job, shared)
    if first is not None:  # its gauges say so from the start, not 0 until the lifespan begins
        state.switch(first)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(state.batcher.run())]
        if first is None:
            tasks.append(asyncio.create_task(_first_load(state, app)))
        else:
            _serve_first(state, app, first)
        yield
        for task in tasks:
            task.cancel()
        if state.log is not None:
            state.log.close()
        for follower in getattr(app.state, "followers", ()):
            follower.stop()

    app = FastAPI(title="pipeline serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))  # 404, 405: MLflow's shape too

    @app.api_route("/health", methods=["GET", "HEAD"])
    @app.api_route("/ping", methods=["GET", "HEAD"])
    async def health():
        return {"status": "alive"}

    @app.api_route("/ready", methods=["GET", "HEAD"])
    async def ready():
        if state.served is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "version": state.served.version}

    @app.get("/version")
    async def version():
        if state.served is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        followers = getattr(app.state, "followers", [None, None])
        # null while the last check found the alias where the server is; else why it may not be
        registry = {"follow_failure": followers[0].failure if followers[0] else None}
        if state.shadow is not None:
            shadow = state.shadow.served
            registry["shadow"] = {
                "alias": state.shadow.alias,
                "version": shadow.version if shadow else None,
                "follow_failure": followers[1].failure if followers[1:] and followers[1] else None,
            }
        return state.served.describe() | registry

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(exposition(state.metrics, shared), media_type=CONTENT_TYPE_LATEST)

    if key := webhook.secret():  # MLflow's registry webhooks: follow a move at once

        @app.post("/webhook")
        async def delivery(request: Request):
            try:
                body = await _body(request, WEBHOOK_BYTES, state.cfg.body_timeout_s)
                event = webhook.verify(key, request.headers, body)
            except (Refused, webhook.Rejected) as exc:
                state.metrics.webhooks.labels("rejected").inc()
                log.info("webhook delivery rejected: %s", exc)
                return _error(exc.status, str(exc))
            followers = getattr(app.state, "followers", [])
            moved = [f for f in followers if webhook.concerns(event, f.name, f.alias)]
            if not moved:
                state.metrics.webhooks.labels("ignored").inc()
                return {"status": "ignored"}
            state.metrics.webhooks.labels("taken").inc()
            for follower in moved:
                follower.nudge()
            return {"status": "checking"}

    @app.post("/invocations")
    async def invocations(request: Request):
        started = time.perf_counter()
        if state.in_flight >= state.cfg.max_in_flight:  # the probes above always answer
            state.metrics.requests.labels("busy").inc()
            _log_refusal(state, state.served, "busy")
            state.metrics.latency.observe(time.perf_counter() - started)
            return _error(503, f"{state.in_flight} requests in progress (serve.max_in_flight)")
        state.in_flight += 1
        try:
            return await _invocations(state, request)
        except ClientDisconnect:
            state.metrics.requests.labels("disconnected").inc()
            log.info("a client left before its request was read")
            return Response(status_code=400)  # nobody reads it
        except Exception as exc:  # noqa: BLE001  (one line to the client, the traceback logged)
            log.exception("request failed")
            state.metrics.requests.labels("failed").inc()
            return _error(500, f"the request failed: {type(exc).__name__}")
        finally:
            state.in_flight -= 1
            state.metrics.latency.observe(time.perf_counter() - started)

    return app


async def _first_load(state: State, app: FastAPI) -> None:
    try:
        served = await asyncio.to_thread(load, state.settings, state.name, state.alias, state.cfg)
    except Exception as exc:  # noqa: BLE001  (named in one line by `pipeline serve`, which exits)
        state.failure = f"{type(exc).__name__}: {exc}"
        log.error("could not load %s@%s: %s", state.name, state.alias, exc)
        app.state.stop()
        return
    _serve_first(state, app, served)


def _serve_first(state: State, app: FastAPI, served: Served) -> None:
    """Answer with `served` and start following the alias (and the shadow's)."""
    import gc

    # What is loaded by now (torch, MLflow, the model) lives as long as the server: kept out
    # of the collector's full passes, which otherwise walk it all and stall answers.
    gc.freeze()
    if state.served is not served:
        state.switch(served)
    log.info("serving %s version %s (@%s)", served.name, served.version, served.alias)
    failed = state.metrics.follow_failures.labels

    def nudges(alias: str) -> Path | None:  # where the workers pass a webhook's nudge on
        return Path(state.shared, f"nudge-{alias}") if state.shared else None

    followers = [
        Follower(
            state.settings,
            state.cfg,
            (state.name, state.alias),
            lambda: state.served,
            state.switch,
            lambda error: failed(error).inc(),
            nudges(state.alias),
        )
    ]
    if (shadow := state.shadow) is not None:  # loaded at its first check, off the requests
        shadow.start()
        followers.append(
            Follower(
                state.settings,
                state.cfg,
                (state.name, shadow.alias),
                lambda: shadow.served,
                shadow.switch,
                lambda error: failed(f"shadow {error}").inc(),
                nudges(shadow.alias),
            )
        )
        followers[1].nudge()
    app.state.followers = followers
    for follower in followers:
        follower.start()


async def _invocations(state: State, request: Request) -> Response:
    metrics, served = state.metrics, state.served
    if served is None:
        metrics.requests.labels("unready").inc()
        _log_refusal(state, served, "unready")
        return _error(503, "the model is still loading; retry when /ready is 200")
    state.batcher.start_decoding()
    try:
        headers = request.headers  # a header sent twice is read whole: both values count
        mime = check_headers(
            ", ".join(headers.getlist("content-type")) or None,
            ", ".join(headers.getlist("content-encoding")) or None,
        )
        body = await _body(request, int(state.cfg.max_body_mb * MB), state.cfg.body_timeout_s)
        decode = (body, mime, served, state.cfg.max_images)
        if len(body) <= INLINE_BYTES:
            pixels = _pixels(*decode)
        else:
            pixels = await asyncio.to_thread(_pixels, *decode)
    except Refused as refused:
        metrics.requests.labels("refused").inc()
        metrics.refusals.labels(refused.reason).inc()
        _log_refusal(state, served, refused.reason)
        log.info("refused (%s): %s", refused.reason, refused)
        return _error(refused.status, str(refused))
    finally:
        state.batcher.stop_decoding()
    try:
        logits, features = await state.batcher.score(served, pixels)
    except Exception:
        metrics.images.labels("failed").inc(len(pixels))
        raise
    metrics.requests.labels("ok").inc()
    metrics.images.labels("ok").inc(len(pixels))
    if state.shadow is not None:
        state.shadow.offer(pixels, served, logits)
    probs, columns = _columns(logits, served, metrics)
    if state.log is not None:
        from pipeline.monitoring.log import Scored

        model = (served.name, served.version)
        reasons = columns.get("abstained")
        images = Scored(pixels, features, probs, columns["prediction"], reasons)
        state.log.scored("serve", model, images)
    rows = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
    return JSONResponse(
        {"predictions": rows, "model": _named(served)},
        headers={"X-Model-Version": f"{served.name}/{served.version}"},
    )


def _log_refusal(state: State, served: Served | None, reason: str) -> None:
    if state.log is not None:  # version 0: none loaded yet
        version = served.version if served is not None else 0
        state.log.refused("serve", (state.name, version), reason)


async def _body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request's body, at most `limit` bytes held. A larger one is read to its end and
    dropped as it arrives, so the client reads a 413 instead of a reset connection (within
    `timeout_s`, as every body: else 408)."""
    chunks, size = [], 0  # a malformed Content-Length never gets here: the HTTP parser's 400

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        if size <= limit:
            raise Refused(
                408, "body_timeout", f"the body took over {timeout_s:g} s to arrive"
            ) from None
    if size > limit:
        raise Refused(
            413,
            "too_large",
            f"the body is {size / MB:.1f} MiB or more; at most {limit / MB:g} MiB "
            "(serve.max_body_mb): send fewer images per request",
        )
    return b"".join(chunks)


def _pixels(body: bytes, mime: str, served: Served, max_images: int) -> np.ndarray:
    """float32 N x C x H x W of the body through `served`'s input contract."""
    from pipeline.tracking.served import pixels

    per_image = int(np.prod(served.contract.shape))
    data = model_input(body, mime, max_values=max_images * per_image + max_images)
    n = count(data)
    if n > max_images:
        raise Refused(
            413,
            "too_many_images",
            f"{n} images in one request; at most {max_images} (serve.max_images): split it",
        )
    try:
        return np.concatenate(list(pixels(data, served.contract)))
    except ValueError as exc:  # the contract's refusals, as `pipeline predict` words them
        raise Refused(400, "contract", str(exc)) from None


def _columns(logits: np.ndarray, served: Served, metrics: Metrics) -> tuple[np.ndarray, dict]:
    """The calibrated probabilities (N x classes) and the answer's columns: MLflow's of the
    probabilities; with abstention on, `prediction` "unknown" where it abstains, `abstained`
    (why, or null) and `set` (the conformal prediction set's classes)."""
    from pipeline.tracking.served import rows
    from pipeline.training.calibration import softmax
    from pipeline.training.conformal import UNKNOWN

    probs = softmax(logits, served.temperature)
    columns = rows(probs, served.contract.classes)
    if served.abstainer is not None:
        sets, reasons = served.abstainer.decide(logits, probs, served.temperature)
        classes = served.contract.classes
        columns["prediction"] = [
            UNKNOWN if why else name
            for name, why in zip(columns["prediction"], reasons, strict=True)
        ]
        columns["abstained"] = reasons
        columns["set"] = [[c for c, kept in zip(classes, s, strict=True) if kept] for s in sets]
        for why in filter(None, reasons):
            metrics.unknown.labels(why).inc()
    for name in columns["prediction"]:
        metrics.predictions.labels(str(served.version), name).inc()
    return probs, columns


def _named(served: Served) -> dict:
    return {"name": served.name, "version": served.version}


def _error(status: int, message: str) -> JSONResponse:
    """MLflow's error shape: {"error_code", "message"}, the code named after the status."""
    from http import HTTPStatus

    code = HTTPStatus(status).name
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


def run(job: Job, address: tuple[str, int]) -> int:
    """Serve `job` on `address` (host, port) until SIGTERM or SIGINT (a graceful stop; the CLI
    exits 143 or 130), or until the first load fails (1, the reason logged in one line).
    ConfigError when the address or the prediction log's store cannot be had. With
    `job.cfg.workers` > 1, see `_supervise`."""
    import socket

    from pipeline.errors import ConfigError
    from pipeline.serving.connections import with_head_bounds

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if job.monitor is not None and job.monitor.log:  # a store that cannot be had: at once
        from pipeline.monitoring.log import open_store

        open_store(job.settings, job.monitor)
    host, port = address
    try:  # bound here, so a port in use is one line, not uvicorn's startup failure
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listening = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port or --host"
        ) from None
    # keep-alive idle 5 s; one log line per event, none per request
    common = {"timeout_keep_alive": 5, "access_log": False, "log_config": None}
    if job.cfg.workers > 1:
        return _supervise(job, common, listening)
    app = create_app(job)
    config = uvicorn.Config(app, http=with_head_bounds(job.cfg.header_timeout_s), **common)
    server = uvicorn.Server(config)
    app.state.stop = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[listening])
    return 1 if app.state.serving.failure else 0


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def _supervise(job: Job, common: dict, listening) -> int:
    """Run `job.cfg.workers` worker processes on `listening` under uvicorn's supervisor, which
    replaces a worker that dies (SIGHUP: replaces each in turn, SIGTTIN/SIGTTOU: one more or
    fewer). Their metrics meet in a temporary folder, removed at the end. A worker that cannot
    load the alias's version stops the server (1)."""
    import os
    import shutil
    import tempfile

    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors.multiprocess import SIGNALS

    shared = tempfile.mkdtemp(prefix="pipeline-serve-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared  # each worker's prometheus_client reads it
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        config = _WorkerConfig(
            job, shared, workers=job.cfg.workers, timeout_worker_healthcheck=READY_S, **common
        )
        supervisor = _Supervisor(config, sockets=[listening])
        supervisor.run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        shutil.rmtree(shared, ignore_errors=True)
    if any(worker.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
        return 1
    if supervisor.stopped_by is not None:  # the CLI's exit status, as one process gives it
        signal.raise_signal(supervisor.stopped_by)
    return 0


class _WorkerConfig(uvicorn.Config):
    """uvicorn's config as each worker process receives it (pickled). The app and the bounded
    protocol cannot be pickled, so `load`, in the worker, builds them. It loads the alias's
    version first, before the worker accepts a connection (so a worker never answers
    "loading"). When it cannot: at the server's start it exits with uvicorn's STARTUP_FAILURE,
    which stops the server; a worker replacing one that died loads the version the others
    serve instead (they keep it while the alias's fails to load), and follows the alias from
    there."""

    def __init__(self, job: Job, shared: str, **kwargs):
        import os

        super().__init__(app="pipeline.serving.app:create_app", **kwargs)  # replaced in `load`
        self.job, self.shared, self.supervisor = job, shared, os.getpid()

    def load(self) -> None:
        from uvicorn.config import STARTUP_FAILURE

        from pipeline.serving.connections import with_head_bounds

        job, shared = self.job, self.shared
        settings, cfg, (name, alias) = job.settings, job.cfg, job.target
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        _die_with_parent(self.supervisor)
        try:
            first = load(settings, name, alias, cfg)
        except Exception as exc:  # noqa: BLE001  (one line; at the start the supervisor stops)
            serving = Path(shared, SERVING)
            if not serving.exists():
                log.error("could not load %s@%s: %s", name, alias, exc)
                sys.exit(STARTUP_FAILURE)
            version = int(serving.read_text())
            log.warning(
                "could not load %s@%s (%s): serving version %s, as the other workers do",
                *(name, alias, exc, version),
            )
            try:
                first = load(settings, name, alias, cfg, pinned=version)
            except Exception as again:  # noqa: BLE001  (the supervisor starts another)
                log.error("could not load version %s either: %s", version, again)
                sys.exit(1)
        try:
            self.app = create_app(job, shared, first)
        except Exception as exc:  # noqa: BLE001  (one line; the supervisor then stops)
            log.error("could not start serving %s@%s: %s", name, alias, exc)
            sys.exit(STARTUP_FAILURE)
        self.http = with_head_bounds(cfg.header_timeout_s)
        super().load()


def _die_with_parent(parent: int) -> None:
    """Have Linux send this worker SIGTERM when its supervisor, process `parent`, dies (even by
    SIGKILL), so no worker is left serving unsupervised on the port."""
    import ctypes
    import os

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # not Linux: nothing to ask
        return
    if os.getppid() != parent:  # it died before the request took hold
        os.kill(os.getpid(), signal.SIGTERM)


class _Supervisor(uvicorn.supervisors.Multiprocess):
    """uvicorn's supervisor of worker processes, remembering the signal that stopped it."""

    stopped_by: int | None = None

    def handle_int(self) -> None:
        self.stopped_by = signal.SIGINT
        super().handle_int()

    def handle_term(self) -> None:
        self.stopped_by = signal.SIGTERM
        super().handle_term()
