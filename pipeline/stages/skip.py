"""skip_if_unchanged: the champion was trained on this data, params and commit already."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.context import RunContext
from pipeline.settings import Settings


def unchanged_stage(cfg: Config, settings: Settings, data_md5: str) -> dict:
    """Whether the champion was trained on this data version, these params and this commit:
    retraining would only reproduce it. Uncommitted code changes never count as unchanged."""
    from mlflow import MlflowClient

    from pipeline.registry import promotion
    from pipeline.tracking import lineage, store

    store.configure(settings, cfg.tracking.experiment)
    champion, run, why_not = promotion.champion_run(MlflowClient(), cfg.register_.model_name)
    if run is None:
        return {"unchanged": False, "reason": why_not}
    where, tags = f"champion v{champion.version}", run.data.tags
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


def record_skip(cfg: Config, settings: Settings, decision: dict, ctx: RunContext) -> str:
    """A run that did not train, on record with its reason, so the schedule's history has no gap."""
    from mlflow import MlflowClient

    from pipeline.tracking import store

    tags = {
        "pipeline.skipped": "true",
        "skip.reason": decision["reason"],
        "skip.champion_run_id": decision["champion_run_id"],
        "data.md5": decision["data_md5"],
        "git.commit": decision["git_commit"],
        "params.hash": cfg.params_hash(),
    }
    run_id = store.new_run(settings, cfg.tracking.experiment, ctx, "skipped-unchanged", tags)
    MlflowClient().set_terminated(run_id)
    return run_id
