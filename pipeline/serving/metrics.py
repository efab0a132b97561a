"""The server's Prometheus metrics, in a registry of its own (`/metrics`). With several worker
processes (`serve.workers`) prometheus_client keeps them in files of a shared folder
(`PROMETHEUS_MULTIPROC_DIR`) and `/metrics` sums the workers' counts; the gauges of what a worker
serves are shown per worker (a `pid` label)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, max_batch: int, shadow: bool = False):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pipeline_serve_requests",
            "Requests to /invocations by outcome",
            ["outcome"],
            registry=r,
        )
        self.images = Counter(
            "pipeline_serve_images", "Images in requests by outcome", ["outcome"], registry=r
        )
        self.refusals = Counter(
            "pipeline_serve_refusals", "Requests refused (4xx) by reason", ["reason"], registry=r
        )
        self.latency = Histogram(
            "pipeline_serve_request_seconds",
            "Time from a request's arrival to its answer (/invocations)",
            buckets=LATENCY_S,
            registry=r,
        )
        sizes = sorted({2**k for k in range(max_batch.bit_length())} | {max_batch})
        self.batch = Histogram(
            "pipeline_serve_batch_images", "Images per scored batch", buckets=sizes, registry=r
        )
        self.predictions = Counter(
            "pipeline_serve_predictions", "Predicted classes", ["version", "cls"], registry=r
        )
        self.unknown = Counter(
            "pipeline_serve_unknown",
            'Images answered "unknown" (serve.abstain), by reason',
            ["reason"],
            registry=r,
        )
        self.version = Gauge(
            "pipeline_serve_model_version",
            "The registered version answering now",
            multiprocess_mode="liveall",
            registry=r,
        )
        self.temperature = Gauge(
            "pipeline_serve_calibration_temperature",
            "The calibration temperature of the version answering now (1: plain softmax)",
            multiprocess_mode="liveall",
            registry=r,
        )
        self.switches = Counter(
            "pipeline_serve_switches",
            "Times the server switched to where its alias moved",
            registry=r,
        )
        self.webhooks = Counter(
            "pipeline_serve_webhooks",
            "Registry webhook deliveries: taken (the alias checked at once), ignored, rejected",
            ["outcome"],
            registry=r,
        )
        self.shadow = Counter(
            "pipeline_serve_shadow_images",
            "Images the shadow model (--shadow) scored too, by outcome: agree or disagree with "
            "the answer's class, unscored (no shadow version, another input shape), dropped",
            ["outcome"],
            registry=r,
        )
        self.shadow_version = (
            Gauge(
                "pipeline_serve_shadow_version",
                "The shadow's registered version (--shadow)",
                multiprocess_mode="liveall",
                registry=r,
            )
            if shadow
            else None
        )
        self.logged = Counter(
            "pipeline_serve_logged_rows",
            "Prediction log rows (monitor.log): written, or dropped (a full buffer, a failed "
            "write)",
            ["outcome"],
            registry=r,
        )
        self.follow_failures = Counter(
            "pipeline_serve_follow_failures",
            "Failed checks or loads of the alias's version (the old one kept serving)",
            ["error"],
            registry=r,
        )


def exposition(metrics: Metrics, shared: str | None) -> bytes:
    """The text of `/metrics`: this process's `metrics`, or with `shared` (the workers' folder,
    `PROMETHEUS_MULTIPROC_DIR`) the sum over every worker, the per-worker gauges of workers that
    have exited dropped (uvicorn replaces a worker that dies)."""
    import os
    from pathlib import Path

    from prometheus_client import generate_latest, multiprocess

    if shared is None:
        return generate_latest(metrics.registry)
    for path in Path(shared).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, shared)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, shared)
    return generate_latest(registry)
