"""Runs left RUNNING by a process that is gone: found and ended KILLED, and listed for people
(`pipeline status --running`).

MLflow keeps no heartbeat, so liveness is read from what a run records: its owner (`train.host`,
`train.pid`: checkable on that host only), its orchestrator try (`airflow.try_number`: a later
try of the same DAG run means the earlier one is over, on whatever host it ran), and when it was
last heard of (its newest system metric, sampled every few seconds while it trains).
"""

from __future__ import annotations

import sys
import time

from pipeline import interrupts
from pipeline.context import RunContext

SILENT_S = 120  # a run unheard of this long, on a host that cannot be checked, is likely lost
# MLflow's sampler logs the first every few seconds; the epochs log the second
HEARTBEATS = ("system/cpu_utilization_percentage", "system/epoch_seconds")


def left_by(pid: str, host: str) -> str:
    """The `train.interrupted` tag of a run whose trainer died without closing it."""
    return f"process {pid} on {host} ended without closing it"


def end_abandoned(client, experiment: str, identity: str, ctx: RunContext, keep: str | None):
    """Runs of this training `identity` left RUNNING by a process that no longer exists: one on
    this host that is gone (SIGKILL, OOM), or, on any host, an earlier try of the orchestrator
    run `ctx` (a lost worker: the orchestrator starts a try only once the one before is over).
    Ended KILLED, saying so; `keep` is the run a resume reopens."""
    query = f"tags.`train.identity` = '{identity}' and attributes.status = 'RUNNING'"
    for left in client.search_runs([experiment], query):
        tags = left.data.tags
        if left.info.run_id != keep and (
            interrupts.gone(tags.get("train.host"), tags.get("train.pid")) or earlier_try(tags, ctx)
        ):
            why = left_by(tags["train.pid"], tags["train.host"])
            client.set_tag(left.info.run_id, "train.interrupted", why)
            client.set_terminated(left.info.run_id, "KILLED")
            print(f"note: MLflow run {left.info.run_id} ended KILLED: {why}", file=sys.stderr)


def earlier_try(tags: dict, ctx: RunContext) -> bool:
    """Whether the run (its `tags`) was recorded by an earlier try of `ctx`'s orchestrator run."""
    if not ctx.ids or tags.get(f"{ctx.origin}.run_id") != str(ctx.ids.get("run_id")):
        return False
    now, then = str(ctx.ids.get("try_number", "")), tags.get(f"{ctx.origin}.try_number", "")
    return now.isdigit() and then.isdigit() and int(then) < int(now)


def running(client, now_ms: int | None = None) -> list[dict]:
    """Every RUNNING run of every experiment, newest first, with its owner, when it was last
    heard of and a verdict: "alive" or "gone" (checked, on this host: a live pid could be
    another process that reused it), "silent" (another host, unheard for SILENT_S: likely lost),
    "heard" (another host, recently) or "unknown" (no process recorded: not a training run).
    Times in ms since the epoch."""
    now_ms = now_ms or int(time.time() * 1000)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = []
    for run in client.search_runs(
        experiments, "attributes.status = 'RUNNING'", order_by=["attributes.start_time DESC"]
    ):
        tags, info = run.data.tags, run.info
        host, pid = tags.get("train.host", ""), tags.get("train.pid", "")
        beats = [m for key in HEARTBEATS for m in client.get_metric_history(info.run_id, key)]
        heard = max([info.start_time, *(m.timestamp for m in beats)])
        if not (host and pid.isdigit()):
            verdict = "unknown"
        elif interrupts.gone(host, pid):
            verdict = "gone"
        elif host == interrupts.owner()["host"]:
            verdict = "alive"
        else:
            verdict = "silent" if now_ms - heard > SILENT_S * 1000 else "heard"
        found.append(
            {
                "run_id": info.run_id,
                "name": info.run_name,
                "host": host,
                "pid": pid,
                "started_ms": info.start_time,
                "heard_ms": heard,
                "verdict": verdict,
            }
        )
    return found
