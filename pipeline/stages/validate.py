"""validate: check data/ against data.dvc, run the GX suite; a failure is put on record."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.data import check_data, read_dataset
from pipeline.data.store import read_meta
from pipeline.files import write_json
from pipeline.settings import Settings


def check_data_stage(cfg: Config, settings: Settings) -> dict:
    return check_data(cfg.base.dataset, settings.root, settings.data_dir)


def validate_stage(cfg: Config, settings: Settings, airflow: dict | None = None) -> dict:
    """Validate data/ (which must match data.dvc); raise `ValidationFailed` on any failure.

    A failure is also put on record in MLflow: a FAILED run with the summary and the Data Docs.
    """
    from pipeline.data.validation import validate_dataset
    from pipeline.errors import ValidationFailed

    data = check_data(cfg.base.dataset, settings.root, settings.data_dir)
    ds = read_dataset(settings.data_dir, mmap=True)
    reference, notes = _drift_reference(cfg, settings, ds.name)
    report = validate_dataset(
        ds, read_meta(settings.data_dir), cfg.validate_, settings.outputs / "gx", reference, notes
    )
    result = {**report.to_dict(), "data_md5": data["data_md5"], "dataset": ds.name}
    write_json(settings.outputs / "validation.json", result)
    print(report.describe())
    if not report.success:
        _record_failed_validation(cfg, settings, result, airflow)
        raise ValidationFailed(report)
    return result


def _drift_reference(cfg: Config, settings: Settings, dataset: str) -> tuple[dict | None, list]:
    """The champion's training-data statistics for the drift bounds, or None and why not."""
    if not cfg.validate_.drift_max_shift:
        return None, []
    from mlflow import MlflowClient

    from pipeline.registry import promotion
    from pipeline.tracking import store

    store.configure(settings, cfg.tracking.experiment)
    client = MlflowClient()
    champion = promotion.alias_version(client, cfg.register_.model_name, promotion.CHAMPION)
    if champion is None:
        return None, ["drift not checked: no champion yet"]
    run, where = store.run_or_none(client, champion.run_id), f"champion v{champion.version}"
    if run is None:
        return None, [f"drift not checked: the run of {where} was deleted"]
    tags = run.data.tags
    if tags.get("data.dataset") != dataset:
        return None, [f"drift not checked: {where} was trained on {tags.get('data.dataset')}"]
    try:
        reference = {k: float(tags[f"data_stats.train.{k}"]) for k in ("pixel_mean", "contrast")}
    except KeyError:
        return None, [f"drift not checked: {where} has no training-data statistics"]
    return reference, [f"drift checked against {where}'s training data"]


def _record_failed_validation(cfg: Config, settings: Settings, result: dict, airflow) -> None:
    import mlflow

    from pipeline.data.validation import summary
    from pipeline.tracking import lineage, store

    store.configure(settings, cfg.tracking.experiment)
    metrics, tags = summary(result)
    tags |= {
        "data.md5": result["data_md5"],
        "data.dataset": result["dataset"],
        "git.commit": lineage.git_state(settings.code)[0],
        "params.hash": cfg.params_hash(),
        **{f"airflow.{k}": str(v) for k, v in (airflow or {}).items()},
    }
    mlflow.start_run(run_name=f"validation-failed-{result['dataset']}", tags=tags)
    try:
        mlflow.log_metrics(metrics)
        mlflow.log_dict(result, "validation.json")
        if Path(result["docs"]).is_file():
            mlflow.log_artifacts(str(Path(result["docs"]).parent), "data_docs")
    finally:
        mlflow.end_run(status="FAILED")
