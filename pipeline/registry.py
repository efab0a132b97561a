"""MLflow helpers: tracking setup, model weights as run artifacts, model versions (created,
found again, resolved from a reference), the promotion lock, and a clear error when MLflow
cannot be reached. The policy and alias moves live in `pipeline.promotion`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.settings import Settings

if TYPE_CHECKING:
    import torch

WEIGHTS = "weights/model.pt"
STATUS_TAG = "registration.status"  # pending until register finished; only complete ones promote


class RegistryUnavailable(RuntimeError):
    """MLflow did not answer after its retries; nothing was promoted."""


def wait_for_server(settings: Settings, log=lambda text: print(text, file=sys.stderr)) -> None:
    """For interactive commands: an MLflow server that does not answer is said at once, retried
    until `settings.mlflow_wait_s`, then a clear error; a local store needs no wait.

    MLflow's own HTTP retries (about 4 minutes per request by default) are bounded too, unless
    MLFLOW_HTTP_REQUEST_* is set, so a server lost mid-command also fails within a minute."""
    import os

    uri = settings.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return
    for key, value in INTERACTIVE_HTTP.items():
        os.environ.setdefault(key, value)
    deadline, delay = time.monotonic() + settings.mlflow_wait_s, 1.0
    while (problem := _unreachable(uri)) is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RegistryUnavailable(
                f"MLflow at {uri} did not answer for {settings.mlflow_wait_s:g} s ({problem}); "
                "nothing was changed. Start it (or fix MLFLOW_TRACKING_URI) and run again"
            )
        if delay == 1.0:
            until = datetime.fromtimestamp(time.time() + left).strftime("%H:%M:%S")
            log(
                f"MLflow at {uri} not reachable ({problem}), retrying until {until} "
                "(PIPELINE_MLFLOW_WAIT_S sets how long)"
            )
        time.sleep(min(delay, left))
        delay = min(delay * 2, 10.0)


# MLflow client retries for interactive commands: 3 tries with 2/4 s backoff, 20 s per request.
INTERACTIVE_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def _unreachable(uri: str) -> str | None:
    """None when the server answers at all (any HTTP status), else why not."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
    return None


def connection_failure(exc: BaseException) -> bool:
    """Whether an MLflow client error means the server could not be reached."""
    import requests

    if isinstance(exc, requests.exceptions.RequestException):
        return True
    text = str(exc)
    return any(
        s in text for s in ("Max retries exceeded", "Connection refused", "Failed to establish")
    )


@contextmanager
def reachable(settings: Settings):
    """Turn MLflow's connection failures (after its own retries with backoff, see
    MLFLOW_HTTP_REQUEST_MAX_RETRIES) into one clear error."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, requests.exceptions.RequestException) as exc:
        text = str(exc)
        if not connection_failure(exc):
            raise
        raise RegistryUnavailable(
            f"MLflow at {settings.tracking_uri} is unreachable ({text.splitlines()[0][:200]}); "
            "nothing was promoted. Start it (or fix MLFLOW_TRACKING_URI) and run the step again: "
            "a retried register finds the version it already created."
        ) from None


@contextmanager
def promotion_lock(settings: Settings, name: str):
    """One registration/promotion of `name` at a time on this machine; across Airflow workers
    the `promotion` pool (one slot) serializes the register tasks."""
    import fcntl

    path = settings.outputs / "locks" / f"promotion-{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def configure(settings: Settings, experiment: str) -> str:
    """Point MLflow at the store and return the experiment id (created with our artifact root)."""
    import mlflow

    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
            parents=True, exist_ok=True
        )
    mlflow.set_tracking_uri(settings.tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        exp_id = found.experiment_id
    else:
        exp_id = mlflow.create_experiment(
            experiment, artifact_location=f"{settings.artifact_root.rstrip('/')}/{experiment}"
        )
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def log_weights(model: torch.nn.Module, spec: dict) -> None:
    """State dict + architecture spec: loads with weights_only=True, no pickled code."""
    import mlflow
    import torch  # here, not at the top: validate and register never need it (5 s to import)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(WEIGHTS).name
        torch.save({"state_dict": model.state_dict(), "spec": spec}, path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(WEIGHTS).parent))


@contextmanager
def run_artifacts(run_id: str, what: str):
    """A run or its artifacts deleted from MLflow becomes a LookupError that says so and what
    to do; a server that cannot be reached stays that (see `reachable`)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as exc:
        if connection_failure(exc):
            raise
        raise LookupError(
            f"the {what} of run {run_id} cannot be read from MLflow "
            f"({str(exc).splitlines()[0][:200]}): the run or its artifacts were deleted. "
            "Serve a version whose run exists (`pipeline status` lists them; `pipeline "
            "rollback` / `pipeline promote` move champion), or train a new one"
        ) from None


def load_weights(run_id: str) -> tuple[torch.nn.Module, dict]:
    import mlflow
    import torch

    from pipeline.train import rebuild

    with tempfile.TemporaryDirectory() as tmp, run_artifacts(run_id, "weights"):
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=WEIGHTS, dst_path=tmp
        )
        saved = torch.load(path, map_location="cpu", weights_only=True)
    model = rebuild(saved["spec"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved["spec"]


def create_version(client, name: str, run, tags: dict):
    """A new version of the run's logged model, pending until `complete`: a crash in between
    leaves it pending (never promoted) and the retried register, finding it, completes it."""
    import mlflow

    return mlflow.register_model(
        run.data.tags["model_uri"], name, tags={**tags, STATUS_TAG: "pending"}
    )


def complete(client, name: str, version: int) -> None:
    client.set_model_version_tag(name, str(version), STATUS_TAG, "complete")


def require_complete(version) -> None:
    status = version.tags.get(STATUS_TAG, "complete")  # versions from before the tag existed
    if status != "complete":
        raise LookupError(
            f"{version.name} v{version.version} did not finish registering ({STATUS_TAG} "
            f"{status}); complete it with `pipeline register --run-id {version.run_id}`"
        )


def record_decision(client, name: str, version: int, run_id: str, report: dict, text: str):
    """The decision report: JSON + markdown on the run, the gist as model-version tags."""
    client.log_dict(run_id, report, "promotion/decision.json")
    client.log_text(run_id, text, "promotion/decision.md")
    decision = report["decision"]
    for key, value in (
        ("promotion.decision", decision["reason"]),
        ("promotion.rule", decision["rule"]),
        ("promotion.report", json.dumps(report)[:5000]),
    ):
        client.set_model_version_tag(name, str(version), key, value)


def find_version(client, name: str, run_id: str):
    """The version already registered from `run_id`, so a retried task does not add another."""
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def resolve(client, ref: str):
    """`NAME` (its champion), `NAME@ALIAS` or `NAME/VERSION` -> the model version.

    Raises LookupError naming what exists when the reference does not resolve."""
    from mlflow.exceptions import MlflowException

    from pipeline.promotion import CHAMPION

    name, alias, version = ref, CHAMPION, None
    if "@" in ref:
        name, alias = ref.split("@", 1)
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
    model = registered_model(client, name)
    if version is None:
        if alias not in (model.aliases or {}):
            known = ", ".join(f"@{a}" for a in sorted(model.aliases or {})) or "none"
            raise LookupError(f"{name} has no alias @{alias}; its aliases: {known}")
        return client.get_model_version_by_alias(name, alias)
    try:
        return client.get_model_version(name, str(int(version)))
    except (MlflowException, ValueError):
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise LookupError(
            f"{name} has no version {version!r}; versions: {', '.join(map(str, versions))}"
        ) from None


def registered_model(client, name: str):
    """The registered model `name`, or LookupError naming the ones that exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if connection_failure(exc):
            raise
        known = ", ".join(m.name for m in client.search_registered_models()) or "none yet"
        raise LookupError(f"no registered model {name!r}; registered models: {known}") from None


def model_status(client) -> list[dict]:
    """Every registered model with its versions, aliases, key metrics and data md5."""
    models = []
    for rm in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        versions = []
        for v in sorted(
            client.search_model_versions(f"name='{rm.name}'"), key=lambda v: int(v.version)
        ):
            run = run_or_none(client, v.run_id)
            run_metrics = run.data.metrics if run else {}
            versions.append(
                {
                    "version": int(v.version),
                    "aliases": sorted(aliases.get(str(v.version), [])),
                    "run_id": v.run_id,
                    "data_md5": v.tags.get("data.md5", ""),
                    "dataset": v.tags.get("data.dataset", ""),
                    "test_accuracy": run_metrics.get("test_accuracy"),
                    "test_macro_f1": run_metrics.get("test_macro_f1"),
                    "status": v.tags.get(STATUS_TAG, "complete") if run else "run deleted",
                    "created": v.creation_timestamp,
                }
            )
        models.append({"name": rm.name, "versions": versions})
    return models


def run_or_none(client, run_id: str | None):
    """The run, or None when it was deleted from the store (`mlflow gc`)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id) if run_id else None
    except MlflowException as exc:
        if connection_failure(exc):
            raise
        return None
