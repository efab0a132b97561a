"""Failure alerts for the DAGs: one log line always, and a JSON POST to a webhook if configured.

The webhook URL comes from the environment variable PIPELINE_ALERT_WEBHOOK or, failing that,
the Airflow connection `pipeline_alerts` (e.g. AIRFLOW_CONN_PIPELINE_ALERTS=https://hooks...).
An alert that cannot be delivered is logged, never raised: it must not hide the failure itself.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request

CONNECTION_ID = "pipeline_alerts"
log = logging.getLogger("pipeline.alerts")


def payload(context: dict) -> dict:
    """What failed, where, on which try, and why (Slack-style `text` plus structured fields)."""
    ti = context.get("ti") or context.get("task_instance")
    dag_id = getattr(context.get("dag"), "dag_id", None) or getattr(ti, "dag_id", None)
    task_id, try_number = getattr(ti, "task_id", None), getattr(ti, "try_number", None)
    error = context.get("exception")
    text = f"{dag_id}.{task_id} failed (run {context.get('run_id')}, try {try_number}): {error}"
    return {
        "text": text[:3000],
        "dag_id": dag_id,
        "task_id": task_id,
        "run_id": context.get("run_id"),
        "try_number": try_number,
        "error": f"{type(error).__name__}: {error}" if error else None,
    }


def webhook_url() -> str | None:
    url = os.environ.get("PIPELINE_ALERT_WEBHOOK")
    if url:
        return url
    try:
        from airflow.sdk import Connection

        conn = Connection.get(CONNECTION_ID)
    except Exception:  # no such connection (the common case): alerts go to the log only
        return None
    return conn.get_uri() if conn.host else None


def post(url: str, body: dict, timeout: float = 10) -> bool:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except OSError as exc:
        log.warning("alert webhook %s failed: %s", url, exc)
        return False


def on_failure(context: dict) -> None:
    """Airflow `on_failure_callback`: called once a task has failed for good (no retries left)."""
    body = payload(context)
    log.error("ALERT %s", body["text"])
    url = webhook_url()
    if url:
        post(url, body)
