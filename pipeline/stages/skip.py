"""skip_if_unchanged: the champion was trained on this data, params and commit already."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.settings import Settings


def unchanged_stage(cfg: Config, settings: Settings, data_md5: str) -> dict:
    """Whether the champion was trained on this data version, these params and this commit:
    retraining would only reproduce it. Uncommitted code changes never count as unchanged."""
    from mlflow import MlflowClient

    from pipeline.registry import promotion
    from pipeline.tracking import lineage, store

    store.configure(settings, cfg.tracking.experiment)
    client = MlflowClient()
    champion = promotion.alias_version(client, cfg.register_.model_name, promotion.CHAMPION)
    if champion is None:
        return {"unchanged": False, "reason": "no champion yet"}
    run, where = store.run_or_none(client, champion.run_id), f"champion v{champion.version}"
    if run is None:
        return {"unchanged": False, "reason": f"the run of {where} was deleted"}
    tags = run.data.tags
    commit, dirty = lineage.git_state(settings.code)
    if dirty or tags.get("git.dirty") != "false":
        return {"unchanged": False, "reason": "uncommitted code changes (here or in " + where + ")"}
    now = {"data md5": data_md5, "params hash": cfg.params_hash(), "git commit": commit}
    then = {
        "data md5": tags.get("data.md5"),
        "params hash": tags.get("params.hash"),
        "git commit": tags.get("git.commit"),
    }
    differs = [key for key in now if now[key] != then[key]]
    if differs:
        return {"unchanged": False, "reason": f"not the same {', '.join(differs)} as {where}"}
    return {
        "unchanged": True,
        "reason": f"same data md5 {data_md5}, params hash {now['params hash']} and git commit "
        f"{commit[:12]} as {where} (run {champion.run_id})",
        "champion_version": int(champion.version),
        "champion_run_id": champion.run_id,
        "data_md5": data_md5,
        "git_commit": commit,
    }


def record_skip(cfg: Config, settings: Settings, decision: dict, airflow: dict | None) -> str:
    """A run that did not train, on record with its reason, so the schedule's history has no gap."""
    import mlflow

    from pipeline.tracking import store

    store.configure(settings, cfg.tracking.experiment)
    tags = {
        "pipeline.skipped": "true",
        "skip.reason": decision["reason"],
        "skip.champion_run_id": decision["champion_run_id"],
        "data.md5": decision["data_md5"],
        "git.commit": decision["git_commit"],
        "params.hash": cfg.params_hash(),
        **{f"airflow.{k}": str(v) for k, v in (airflow or {}).items()},
    }
    with mlflow.start_run(run_name="skipped-unchanged", tags=tags) as run:
        return run.info.run_id
