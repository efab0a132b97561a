"""validate: check data/ against data.dvc, run the GX suite; a failure is put on record."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.context import RunContext
from pipeline.data import check_data, read_dataset
from pipeline.data.store import read_meta
from pipeline.settings import Settings


def check_data_stage(cfg: Config, settings: Settings) -> dict:
    """{"data_md5", ...} of data/; DataError when it is missing or differs from data.dvc."""
    return check_data(cfg.base.dataset, settings.root, settings.data_dir)


def run(cfg: Config, settings: Settings, inputs: dict, ctx: RunContext) -> dict:
    """The graph's validate stage (it needs no earlier hand-off)."""
    return validate_stage(cfg, settings, ctx)


def validate_stage(cfg: Config, settings: Settings, ctx: RunContext | None = None) -> dict:
    """Validate data/ (which must match data.dvc); the report as a dict with "success",
    "failed", "stats", "docs", "data_md5" and "dataset". Raises `ValidationFailed` on any
    failure, which is also put on record in MLflow: a FAILED run with the summary and the Data
    Docs. Raises DataError when data/ is missing or untracked."""
    from pipeline.data.validation import validate_dataset
    from pipeline.errors import ValidationFailed

    data = check_data(cfg.base.dataset, settings.root, settings.data_dir)
    ds = read_dataset(settings.data_dir, mmap=True)
    reference, drift = _drift_reference(cfg, settings, ds.name)
    report = validate_dataset(
        ds, read_meta(settings.data_dir), cfg.validate_, settings.outputs / "gx", reference
    )
    print(report.describe(drift))
    # The hand-off (a dvc.yaml out, train's dep) holds only what data/ and params decide: the
    # drift note names the champion and the Data Docs path the folder, so either would make
    # a promotion or another checkout re-run validate and train.
    result = {
        **report.to_dict(),
        "docs": _relative(Path(report.docs), settings.root),
        "data_md5": data["data_md5"],
        "dataset": ds.name,
    }
    if not report.success:
        failed = {**result, "notes": [*result["notes"], drift]}
        _record_failed_validation(cfg, settings, failed, ctx or RunContext())
        raise ValidationFailed(report, handoff=result)
    return result


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _drift_reference(cfg: Config, settings: Settings, dataset: str) -> tuple[dict | None, str]:
    """The champion's training-data statistics for the drift bounds, or None; and a note
    saying which, or why not."""
    if not cfg.validate_.drift_max_shift:
        return None, "drift not checked: validate.drift_max_shift is off"
    from mlflow import MlflowClient

    from pipeline.registry import promotion
    from pipeline.tracking import store

    store.configure(settings, cfg.tracking.experiment)
    champion, run, why_not = promotion.champion_run(MlflowClient(), cfg.register_.model_name)
    if run is None:
        return None, f"drift not checked: {why_not}"
    where, tags = f"champion v{champion.version}", run.data.tags
    if tags.get("data.dataset") != dataset:
        return None, f"drift not checked: {where} was trained on {tags.get('data.dataset')}"
    try:
        reference = {k: float(tags[f"data_stats.train.{k}"]) for k in ("pixel_mean", "contrast")}
    except KeyError:
        return None, f"drift not checked: {where} has no training-data statistics"
    return reference, f"drift checked against {where}'s training data"


def _record_failed_validation(cfg: Config, settings: Settings, result: dict, ctx) -> None:
    import mlflow

    from pipeline.data.validation import summary
    from pipeline.tracking import lineage, store

    counts, tags = summary(result)  # counts as tags: no chart for a number logged once
    tags |= {k: str(v) for k, v in counts.items()} | {
        "data.md5": result["data_md5"],
        "data.dataset": result["dataset"],
        "git.commit": lineage.git_state(settings.code)[0],
        "params.hash": cfg.params_hash(),
    }
    name = f"validation-failed-{result['dataset']}"
    mlflow.start_run(run_id=store.new_run(settings, cfg.tracking.experiment, ctx, name, tags))
    try:
        mlflow.log_dict(result, "validation.json")
        docs = settings.root / result["docs"]
        if docs.is_file():
            mlflow.log_artifacts(str(docs.parent), "data_docs")
    finally:
        mlflow.end_run(status="FAILED")
