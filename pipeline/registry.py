"""MLflow helpers: tracking setup, model weights as run artifacts, registration and promotion.

Aliases: `challenger` is the newest candidate, `champion` the serving model. The champion moves
only through `decide`, against the champion re-scored on this run's test data.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.settings import Settings

WEIGHTS = "weights/model.pt"
CHAMPION, CHALLENGER = "champion", "challenger"


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

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(WEIGHTS).name
        torch.save({"state_dict": model.state_dict(), "spec": spec}, path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(WEIGHTS).parent))


def load_weights(run_id: str) -> tuple[torch.nn.Module, dict]:
    import mlflow

    from pipeline.train import rebuild

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=WEIGHTS, dst_path=tmp
        )
        saved = torch.load(path, map_location="cpu", weights_only=True)
    model = rebuild(saved["spec"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved["spec"]


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(score: float, champion_score: float | None, floor: float, metric: str) -> Decision:
    """The promotion gate: meet the floor, and be no worse than the champion on the same data."""
    if score < floor:
        return Decision(False, f"{metric} {score:.4f} is below the floor {floor:.4f}")
    if champion_score is None:
        return Decision(
            True, f"first model meeting the floor ({metric} {score:.4f} >= {floor:.4f})"
        )
    if score >= champion_score:
        return Decision(
            True, f"{metric} {score:.4f} >= champion's {champion_score:.4f} on this data"
        )
    return Decision(False, f"{metric} {score:.4f} < champion's {champion_score:.4f} on this data")


def find_version(client, name: str, run_id: str):
    """The version already registered from `run_id`, so a retried task does not add another."""
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def resolve(client, ref: str):
    """`NAME` (its champion), `NAME@ALIAS` or `NAME/VERSION` -> the model version.

    Raises LookupError naming what exists when the reference does not resolve."""
    from mlflow.exceptions import MlflowException

    name, alias, version = ref, CHAMPION, None
    if "@" in ref:
        name, alias = ref.split("@", 1)
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(m.name for m in client.search_registered_models()) or "none yet"
        raise LookupError(f"no registered model {name!r}; registered models: {known}") from None
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


def champion_version(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


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
            run_metrics = client.get_run(v.run_id).data.metrics if v.run_id else {}
            versions.append(
                {
                    "version": int(v.version),
                    "aliases": sorted(aliases.get(str(v.version), [])),
                    "run_id": v.run_id,
                    "data_md5": v.tags.get("data.md5", ""),
                    "dataset": v.tags.get("data.dataset", ""),
                    "test_accuracy": run_metrics.get("test_accuracy"),
                    "test_macro_f1": run_metrics.get("test_macro_f1"),
                    "created": v.creation_timestamp,
                }
            )
        models.append({"name": rm.name, "versions": versions})
    return models
