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


def pinned_version(settings: Settings, published: list[dict]) -> dict:
    """The data version a DAG run works on, as a data.dvc entry ({"md5", "size", ...}): the
    newest of `published` (the extras of the Asset events that triggered the run, where
    publish_dataset hands on its "pointer"), else this workspace's data.dvc."""
    from pipeline.data.versioning import pointer

    handed = [e["pointer"] for e in published if isinstance(e.get("pointer"), dict)]
    return handed[-1] if handed else pointer(settings.root)


def checkout_stage(settings: Settings, pinned: dict) -> dict:
    """Make this workspace's data/ the `pinned` version (from the DVC remote when it holds
    another), so every task of a run reads the version the run started with, on any host.
    {"data_md5", "changed"}; DataError when no store has it."""
    from pipeline.data.versioning import checkout

    changed = checkout(settings.root, pinned)
    if changed:
        print(f"data: checked out {pinned['md5']}, the version this run pinned")
    return {"data_md5": pinned["md5"], "changed": changed}


def run(cfg: Config, settings: Settings, inputs: dict, ctx: RunContext) -> dict:
    """The graph's validate stage (it needs no earlier hand-off)."""
    return validate_stage(cfg, settings, ctx)


def validate_stage(cfg: Config, settings: Settings, ctx: RunContext | None = None) -> dict:
    """Validate data/ (which must match data.dvc); the report as a dict with "success",
    "failed", "stats", "docs", "data_md5" and "dataset". Raises `ValidationFailed` on any
    failure, which is also put on record in MLflow: a FAILED run with the summary and the Data
    Docs. With `ctx.remote_handoffs` (a DAG's task: train may run on another host) a pass is put
    on record too, as a FINISHED run, and "docs_run" names it: train copies the Data Docs from
    there, not from this workspace. Raises DataError when data/ is missing or untracked."""
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
    ctx = ctx or RunContext()
    if not report.success:
        failed = {**result, "notes": [*result["notes"], drift]}
        _record_validation(cfg, settings, failed, ctx)
        raise ValidationFailed(report, handoff=result)
    if ctx.remote_handoffs:
        result["docs_run"] = _record_validation(cfg, settings, result, ctx)
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


def _record_validation(cfg: Config, settings: Settings, result: dict, ctx) -> str:
    """The validation as an MLflow run (FAILED or FINISHED) with its report and Data Docs
    (`data_docs/`); its id."""
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
    outcome = "passed" if result["success"] else "failed"
    name = f"validation-{outcome}-{result['dataset']}"
    run_id = store.new_run(settings, cfg.tracking.experiment, ctx, name, tags)
    mlflow.start_run(run_id=run_id)
    try:
        mlflow.log_dict(result, "validation.json")
        docs = settings.root / result["docs"]
        if docs.is_file():
            mlflow.log_artifacts(str(docs.parent), "data_docs")
    finally:
        mlflow.end_run(status="FINISHED" if result["success"] else "FAILED")
    return run_id
