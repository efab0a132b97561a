"""Failure alerts: the message names the task, run, try and error; Apprise delivers it over real
HTTP (a JSON webhook on loopback); an unreachable destination never raises."""

import json
from types import SimpleNamespace

from pipeline import alerts


def _context():
    ti = SimpleNamespace(dag_id="train_image_classifier", task_id="validate", try_number=1)
    return {
        "ti": ti,
        "run_id": "manual__2026-11-28",
        "exception": RuntimeError("validation FAILED: [test] class_balance"),
    }


def test_failure_is_sent_to_the_urls_from_the_environment(webhook, monkeypatch):
    url, received = webhook
    monkeypatch.setenv("PIPELINE_ALERT_URLS", url.replace("http://", "json://"))
    alerts.on_failure(_context())
    (body,) = received
    assert body["title"] == "Airflow task failed: train_image_classifier.validate"
    assert body["type"] == "failure"
    assert body["message"] == (
        "train_image_classifier.validate failed (run manual__2026-11-28, try 1): "
        "RuntimeError: validation FAILED: [test] class_balance"
    )


def test_destinations_from_an_airflow_apprise_connection(webhook, monkeypatch):
    url, received = webhook
    monkeypatch.delenv("PIPELINE_ALERT_URLS", raising=False)
    conn = {
        "conn_type": "apprise",
        "extra": {"config": {"path": url.replace("http://", "json://")}},
    }
    monkeypatch.setenv("AIRFLOW_CONN_PIPELINE_ALERTS", json.dumps(conn))
    assert alerts.destinations() == []  # the connection holds them
    alerts.on_failure(_context())
    assert len(received) == 1 and received[0]["title"].endswith(".validate")


def test_no_destination_configured_or_unreachable_only_logs(monkeypatch, caplog):
    # Straight onto the logger: Airflow's structlog setup (a DagBag loaded earlier in this
    # process) reroutes the root logger, where caplog listens by default.
    monkeypatch.setattr(alerts.log, "handlers", [caplog.handler])
    monkeypatch.delenv("PIPELINE_ALERT_URLS", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_PIPELINE_ALERTS", raising=False)
    assert alerts.destinations() is None
    alerts.on_failure(_context())  # logs, sends nothing
    assert "ALERT train_image_classifier.validate failed" in caplog.text
    monkeypatch.setenv("PIPELINE_ALERT_URLS", "json://127.0.0.1:9/nothing-listens")
    alerts.on_failure(_context())  # must not raise
    monkeypatch.setenv("PIPELINE_ALERT_URLS", "no-such-scheme://x")
    alerts.on_failure(_context())  # nor for a URL Apprise does not know
