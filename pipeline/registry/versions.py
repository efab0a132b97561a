"""Registered model versions: created pending and completed, found again by run id, resolved
from a reference, listed with their status; the promotion lock."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline.settings import Settings
from pipeline.tracking.server import connection_failure
from pipeline.tracking.store import run_or_none

if TYPE_CHECKING:
    from pipeline.data.contract import InputContract

STATUS_TAG = "registration.status"  # pending until register finished; only complete ones promote


LOCK_WAIT_S = 600  # a promotion rescoring a big champion takes minutes


@contextmanager
def promotion_lock(settings: Settings, name: str):
    """One alias move of `name` at a time (register, compress, promote, rollback), held where
    the registry lives: a PostgreSQL advisory lock in `settings.registry_lock` (a deployment:
    every machine that moves aliases takes the same one), else a file lock in the project (the
    SQLite default: one machine). Waits up to LOCK_WAIT_S, saying so, then RuntimeError."""
    from pipeline.files import exclusive, safe_name

    # The name comes from the CLI or params.yaml: never a path out of the locks folder.
    safe = safe_name(name, "the model name")
    if settings.registry_lock:
        with _advisory_lock(settings.registry_lock, f"promotion:{name}"):
            yield
        return
    if settings.tracking_uri.startswith(("http://", "https://")):
        print(
            "note: alias moves are serialized on this machine only (a file lock); set "
            "PIPELINE_REGISTRY_LOCK_URI to the registry's PostgreSQL database to serialize "
            "them across machines",
            file=sys.stderr,
        )
    with exclusive(settings.locks / f"promotion-{safe}.lock"):
        yield


@contextmanager
def _advisory_lock(url: str, key: str):
    """PostgreSQL's session advisory lock on `key` (hashed to 64 bits) in the database at `url`
    (an SQLAlchemy URL, `postgresql+psycopg2://...` too); released when the block ends or the
    process dies (its connection closes)."""
    import hashlib
    import re

    import psycopg2

    from pipeline.errors import ConfigError

    number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
    dsn = re.sub(r"^postgresql\+\w+://", "postgresql://", url)
    shown = re.sub(r"//[^@/]*@", "//***@", dsn)  # never the password in a message
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            f"PIPELINE_REGISTRY_LOCK_URI is {shown!r}: the promotion lock needs a PostgreSQL "
            "URL (postgresql://USER:PASSWORD@HOST:5432/DB, the registry's database)"
        )
    try:
        connection = psycopg2.connect(dsn, connect_timeout=10)
    except psycopg2.Error as exc:
        raise ConfigError(
            f"the promotion lock's database (PIPELINE_REGISTRY_LOCK_URI {shown}) cannot be "
            f"reached: {str(exc).strip().splitlines()[-1]}; fix the URL or start the database. "
            "Nothing was changed"
        ) from None
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", (number,))
            if not cursor.fetchone()[0]:
                held = f"waiting for the registry lock ({key}): another alias move holds it"
                print(held, file=sys.stderr, flush=True)
                cursor.execute("SET lock_timeout = %s", (f"{LOCK_WAIT_S}s",))
                try:
                    cursor.execute("SELECT pg_advisory_lock(%s)", (number,))
                except psycopg2.errors.LockNotAvailable:
                    raise RuntimeError(
                        f"the registry lock ({key}) stayed held for {LOCK_WAIT_S} s by another "
                        "alias move; run this again when it has finished"
                    ) from None
        yield
    finally:
        connection.close()


def create_version(client, name: str, run, tags: dict):
    """A new version of the run's MLflow model (exported now if the run has none), pending
    until `complete`: a crash in between leaves it pending (never promoted) and the retried
    register, finding it, completes it."""
    import mlflow

    from pipeline.tracking.weights import export_model

    uri = export_model(run.info.run_id)
    return mlflow.register_model(uri, name, tags={**tags, STATUS_TAG: "pending"})


def tag_inputs(client, name: str, version: int, contract: InputContract) -> None:
    """What the version takes, as tags (`input.contract`, `classes`); `record_decision` writes
    it in words into the description, which the MLflow UI shows."""
    client.set_model_version_tag(
        name, str(version), "input.contract", json.dumps(contract.to_dict())
    )
    client.set_model_version_tag(name, str(version), "classes", json.dumps(list(contract.classes)))


WEIGHTS_TAG = "weights.sha256"  # what predict and serving check the downloaded file against


def tag_weights(client, name: str, version: int, run_id: str) -> None:
    """The sha256 of the version's weights file, as a tag (`weights.sha256`): the file a
    prediction later downloads must be this one. Written once: a retried register keeps the
    digest its first try read."""
    from pipeline.tracking.weights import weights_digest

    if WEIGHTS_TAG not in client.get_model_version(name, str(version)).tags:
        client.set_model_version_tag(name, str(version), WEIGHTS_TAG, weights_digest(run_id))


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
    """The decision report: JSON + markdown on the run, the gist as model-version tags, and
    the version's description (model_card.version_description) rewritten around it."""
    from pipeline.data.contract import InputContract
    from pipeline.registry.model_card import version_description

    client.log_dict(run_id, report, "promotion/decision.json")
    client.log_text(run_id, text, "promotion/decision.md")
    decision = report["decision"]
    for key, value in (
        ("promotion.decision", decision["reason"]),
        ("promotion.rule", decision["rule"]),
        ("promotion.report", json.dumps(report)[:5000]),
    ):
        client.set_model_version_tag(name, str(version), key, value)
    contract = client.get_model_version(name, str(version)).tags.get("input.contract")
    inputs = InputContract.from_dict(json.loads(contract)).describe() if contract else "-"
    text = version_description(name, version, client.get_run(run_id), report, inputs)
    client.update_model_version(name, str(version), description=text)


def find_version(client, name: str, run_id: str):
    """The version already registered from `run_id`, so a retried task does not add another."""
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def resolve(client, ref: str):
    """`NAME` (its champion), `NAME@ALIAS` or `NAME/VERSION` -> the model version.

    Raises LookupError naming what exists when the reference does not resolve."""
    from mlflow.exceptions import MlflowException

    from pipeline.registry.promotion import CHAMPION

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
    """The registered model `name`, or LookupError naming the ones that exist; ConfigError for
    a name that is a path (`safe_name`)."""
    from mlflow.exceptions import MlflowException

    from pipeline.files import safe_name

    safe_name(name, "the model name")
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if connection_failure(exc):
            raise
        known = ", ".join(m.name for m in client.search_registered_models()) or "none yet"
        raise LookupError(f"no registered model {name!r}; registered models: {known}") from None


def _made_by(tags: dict) -> str:
    method = tags.get("compress.method")
    if not method:
        return ""
    teacher = tags.get("compress.teacher_model") or tags.get("compress.teacher_run_id")
    return f"{method} of {teacher}"


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
                    # e.g. "quantize of image-classifier/1": what a compressed version came from
                    "made_by": _made_by(run.data.tags) if run else "",
                    # DP-SGD's epsilon (train.privacy), None when trained without it
                    "epsilon": float(v.tags["privacy.epsilon"])
                    if "privacy.epsilon" in v.tags
                    else None,
                    "created": v.creation_timestamp,
                }
            )
        models.append({"name": rm.name, "versions": versions})
    return models
