"""Failure alerts for the DAGs: one log line always, and a message through Apprise if configured.

Destinations are Apprise URLs (Slack, Teams, e-mail, PagerDuty, a plain JSON webhook with
`json://host/path`, and about a hundred more), sent by the Apprise provider's Airflow notifier.
They come from the environment variable PIPELINE_ALERT_URLS (space or comma separated) or,
failing that, the Airflow connection `pipeline_alerts` of type apprise. An alert that cannot be
delivered is logged, never raised: it must not hide the failure itself.
"""

from __future__ import annotations

import logging
import os
import re

CONNECTION_ID = "pipeline_alerts"
log = logging.getLogger("pipeline.alerts")


def describe(context: dict) -> tuple[str, str]:
    """(title, text): what failed, where, on which try, and why."""
    ti = context.get("ti") or context.get("task_instance")
    dag_id = getattr(context.get("dag"), "dag_id", None) or getattr(ti, "dag_id", None)
    task_id, try_number = getattr(ti, "task_id", None), getattr(ti, "try_number", None)
    error = context.get("exception")
    reason = f"{type(error).__name__}: {error}" if error else "no exception recorded"
    text = f"{dag_id}.{task_id} failed (run {context.get('run_id')}, try {try_number}): {reason}"
    return f"Airflow task failed: {dag_id}.{task_id}", text[:3000]


def destinations() -> list[str] | None:
    """The Apprise URLs from PIPELINE_ALERT_URLS; [] when the `pipeline_alerts` connection holds
    them instead; None when no alert is configured (the common case): the log line only."""
    urls = [u for u in re.split(r"[\s,]+", os.environ.get("PIPELINE_ALERT_URLS", "")) if u]
    if urls:
        return urls
    try:
        from airflow.sdk import Connection

        Connection.get(CONNECTION_ID)
    except Exception:  # no such connection
        return None
    return []


def on_failure(context: dict) -> None:
    """Airflow `on_failure_callback`: called once a task has failed for good (no retries left)."""
    title, text = describe(context)
    log.error("ALERT %s", text)
    urls = destinations()
    if urls is None:
        return
    from airflow.providers.apprise.notifications.apprise import AppriseNotifier
    from apprise import NotifyType

    notifier = AppriseNotifier(
        title=title,
        body=text,
        notify_type=NotifyType.FAILURE,
        config=" ".join(urls) or None,  # None: the URLs of the `pipeline_alerts` connection
        apprise_conn_id=CONNECTION_ID,
    )
    try:
        notifier.notify(context)
    except Exception as exc:  # a broken connection or URL: said, never raised
        log.warning("alert not delivered (%s: %s)", type(exc).__name__, exc)
