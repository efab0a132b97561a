"""What the commands print for people: the status table, the alias history, the run summary."""

from __future__ import annotations

import time

from pipeline.tracking.store import ui_path

MLFLOW_UI_HINT = "make mlflow-ui   (or: .venv/bin/mlflow ui --backend-store-uri {uri})"


def history(name: str, events: list[dict]) -> str:
    if not events:
        return f"no alias moves recorded for {name}"
    lines = []
    for e in events:
        was = f"(was v{e['previous']})" if e["previous"] else "(new)"
        lines.append(
            f"{e['at']}  {e['alias']:<17} v{e['version']:<4}{was:<10} {e['by']}: {e['reason']}"
        )
    return "\n".join(lines)


def status(models: list[dict]) -> str:
    if not models:
        return "no registered models yet; run `make run`"
    lines = []
    for model in models:
        lines.append(model["name"])
        for v in reversed(model["versions"]):
            acc = "-" if v["test_accuracy"] is None else f"{v['test_accuracy']:.4f}"
            aliases = ",".join(v["aliases"]) or "-"
            if v["status"] != "complete":
                aliases = f"{aliases} ({v['status']})"
            made = f"  ({v['made_by']})" if v.get("made_by") else ""
            if v.get("epsilon") is not None:
                made += f"  (DP-SGD epsilon {v['epsilon']:.3g})"
            lines.append(
                f"  v{v['version']:<3} {aliases:<30} test_accuracy {acc}  "
                f"data {v['dataset']}@{v['data_md5']}  run {v['run_id']}{made}"
            )
    return "\n".join(lines)


VERDICTS = {
    "alive": "its process lives",
    "gone": "no live process: its process is gone from this host",
    "silent": "no live process heard: likely lost with its host",
    "heard": "on another host, heard of recently",
    "unknown": "no process recorded (not a training run)",
}


def running(runs: list[dict]) -> str:
    """The RUNNING runs (`orphans.running`), each with its owner and verdict."""
    if not runs:
        return "no MLflow run is RUNNING"
    now = time.time()
    lines = [f"{len(runs)} MLflow run(s) RUNNING:"]
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started_ms"] / 1000))
        owner = f"process {r['pid']} on {r['host']}" if r["host"] else "no recorded process"
        ago = max(0, round(now - r["heard_ms"] / 1000))
        lines.append(
            f"  {r['run_id']}  {r['name']}  {owner}  started {started}, last heard {ago} s ago: "
            f"{VERDICTS[r['verdict']]}"
        )
    if any(r["verdict"] in ("gone", "silent") for r in runs):
        lines.append(
            "The next try of the same training ends such a run KILLED: the DAG task's retry, "
            "or `pipeline train --resume` with the same params on the host that ran it."
        )
    return "\n".join(lines)


def summary(run, registered: list[tuple[str, dict]], tracking_uri: str) -> str:
    """The latest MLflow run and the versions registered from it."""
    tags, metrics = run.data.tags, run.data.metrics
    lines = ["", "=== pipeline run summary ==="]
    if tags.get("pipeline.skipped") == "true":
        return "\n".join(
            [
                *lines,
                f"run            {run.info.run_name} ({run.info.run_id}): nothing trained",
                f"reason         {tags.get('skip.reason')}",
                "retrain        trigger the DAG with force_retrain=true",
            ]
        )
    validated = "passed" if tags.get("validation.success") == "true" else "FAILED"
    lines += [
        f"run            {run.info.run_name} ({run.info.run_id}, {run.info.status})",
        f"data version   {tags.get('data.dataset')} md5 {tags.get('data.md5')}",
        f"validation     {validated} ({tags.get('validation.evaluated')} expectations)",
        f"test accuracy  {metrics.get('test_accuracy', float('nan')):.4f}"
        f"   macro-F1 {metrics.get('test_macro_f1', float('nan')):.4f}",
    ]
    for name, v in registered:
        aliases = ", ".join(v["aliases"]) or "-"
        lines.append(f"registered     {name} version {v['version']} aliases: {aliases}")
    if not registered:
        lines.append("registered     (not registered)")
    lines.append(f"MLflow UI      {MLFLOW_UI_HINT.format(uri=tracking_uri)}")
    lines.append(f"its runs       http://127.0.0.1:5000{ui_path(run.info.experiment_id)}")
    return "\n".join(lines)
