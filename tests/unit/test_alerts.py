"""Failure alerts: the payload names the task, run, try and error; the webhook gets it over real
HTTP (a server on loopback); an unreachable webhook never raises."""

from types import SimpleNamespace

from pipeline import alerts


def _context():
    ti = SimpleNamespace(dag_id="train_image_classifier", task_id="validate", try_number=1)
    return {
        "ti": ti,
        "run_id": "manual__2026-11-28",
        "exception": RuntimeError("validation FAILED: [test] class_balance"),
    }


def test_failure_is_posted_to_the_webhook_from_the_environment(webhook, monkeypatch):
    url, received = webhook
    monkeypatch.setenv("PIPELINE_ALERT_WEBHOOK", url)
    alerts.on_failure(_context())
    (body,) = received
    assert body["dag_id"] == "train_image_classifier" and body["task_id"] == "validate"
    assert body["run_id"] == "manual__2026-11-28" and body["try_number"] == 1
    assert body["error"] == "RuntimeError: validation FAILED: [test] class_balance"
    assert body["text"].startswith("train_image_classifier.validate failed (run manual__")


def test_webhook_from_an_airflow_connection(webhook, monkeypatch):
    url, received = webhook
    monkeypatch.delenv("PIPELINE_ALERT_WEBHOOK", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_PIPELINE_ALERTS", url)
    assert alerts.webhook_url() == url
    alerts.on_failure(_context())
    assert len(received) == 1


def test_no_webhook_configured_or_unreachable_only_logs(monkeypatch, caplog):
    # Straight onto the logger: Airflow's structlog setup (a DagBag loaded earlier in this
    # process) reroutes the root logger, where caplog listens by default.
    monkeypatch.setattr(alerts.log, "handlers", [caplog.handler])
    monkeypatch.delenv("PIPELINE_ALERT_WEBHOOK", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_PIPELINE_ALERTS", raising=False)
    assert alerts.webhook_url() is None
    alerts.on_failure(_context())  # logs, posts nothing
    assert "ALERT train_image_classifier.validate failed" in caplog.text
    monkeypatch.setenv("PIPELINE_ALERT_WEBHOOK", "http://127.0.0.1:9/nothing-listens")
    alerts.on_failure(_context())  # must not raise
    assert "alert webhook" in caplog.text
