"""MLflow registry webhooks: the tracking server tells `pipeline serve` when an alias moves, so
it follows within a second instead of within `serve.poll_s` (polling stays as the fallback).

MLflow 3's tracking server POSTs `model_version_alias.created` / `.deleted` events to a URL
registered with `MlflowClient.create_webhook`, signed with a shared secret: the header
`X-MLflow-Signature` is `v1,` + base64 of HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>")
(mlflow/webhooks/delivery.py). A delivery is taken only with a valid signature and a timestamp
within `MAX_AGE_S` of now (replays are refused), and it only wakes the follower: what the
server loads is always what the registry says, never what the request says."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time

SECRET_ENV = "PIPELINE_SERVE_WEBHOOK_SECRET"
EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
MAX_AGE_S = 300


class Rejected(Exception):
    """A delivery that is not MLflow's (401) or not readable (400)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def secret() -> str | None:
    """The shared secret (PIPELINE_SERVE_WEBHOOK_SECRET), or None: no webhook route."""
    return os.environ.get(SECRET_ENV) or None


def verify(key: str, headers, body: bytes, now: float | None = None) -> dict:
    """The delivery's JSON once its signature and age are checked; Rejected otherwise."""
    delivery = headers.get("x-mlflow-delivery-id") or ""
    stamp = headers.get("x-mlflow-timestamp") or ""
    signature = headers.get("x-mlflow-signature") or ""
    if not stamp.isdigit() or abs((now or time.time()) - int(stamp)) > MAX_AGE_S:
        raise Rejected(
            401, f"the delivery's X-MLflow-Timestamp is missing or over {MAX_AGE_S} s old"
        )
    signed = f"{delivery}.{stamp}.".encode() + body
    expected = (
        "v1," + base64.b64encode(hmac.new(key.encode(), signed, hashlib.sha256).digest()).decode()
    )
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise Rejected(401, f"the delivery's signature does not match {SECRET_ENV}")
    try:
        return json.loads(body)
    except ValueError:
        raise Rejected(400, "the delivery is not JSON") from None


def concerns(event: dict, name: str, alias: str) -> bool:
    """Whether `event` moved `name@alias`."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    action = f"{event.get('entity')}.{event.get('action')}"
    return action in EVENTS and data.get("name") == name and data.get("alias") == alias


def register(client, url: str, name: str, alias: str, key: str | None) -> str:
    """Create, or point at `url`, the tracking server's webhook for `name@alias`'s moves
    (named `pipeline-serve-<name>-<alias>`, signed with `key`); returns its id. ConfigError when
    the registry is a local store, which sends no webhooks, or without a secret."""
    from pipeline.errors import ConfigError

    if not client.tracking_uri.startswith(("http://", "https://")):
        raise ConfigError(
            "--webhook-url: webhooks are sent by an MLflow tracking server, and "
            f"MLFLOW_TRACKING_URI is the local store {client.tracking_uri}: the server polls "
            "it every serve.poll_s"
        )
    if key is None:
        raise ConfigError(
            f"--webhook-url needs the secret MLflow signs deliveries with: set {SECRET_ENV}"
        )
    from mlflow.exceptions import MlflowException

    title = f"pipeline-serve-{name}-{alias}"
    try:
        for hook in client.list_webhooks():
            if hook.name == title:
                client.update_webhook(hook.webhook_id, url=url, events=list(EVENTS), secret=key)
                return hook.webhook_id
        return client.create_webhook(title, url, list(EVENTS), secret=key).webhook_id
    except MlflowException as exc:  # the tracking server's own rules on webhook URLs
        raise ConfigError(
            f"--webhook-url {url}: the tracking server refused it ({exc.message}). It takes "
            "https URLs unless its MLFLOW_WEBHOOK_ALLOWED_SCHEMES lists http, and delivers to "
            "private addresses only with MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true"
        ) from None
