"""register and promote: a version per run (idempotent), the policy moves champion."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Config, ConfigError
from pipeline.context import RunContext
from pipeline.errors import OutOfOrder
from pipeline.settings import Settings
from pipeline.stages.evaluate import current_data, rescore


def _gate(cfg: Config, data, client, name: str, version: int, challenger: dict, run_id: str):
    """Decide against the current champion (scored on `data()`, see `current_data`), re-read it
    right before the alias would move, and decide again if another promotion moved it meanwhile.
    With the efficiency option, both models' size figures are taken from their weights.
    Returns (decision, champion)."""
    from pipeline.registry import policy, promotion, versions

    efficiency = cfg.register_.max_accuracy_drop is not None
    challenger = {**challenger, **_privacy(client.get_run(run_id).data.tags)}
    if efficiency:
        challenger = {**challenger, **_figures(run_id)}
    for _ in range(3):
        champion = promotion.alias_version(client, name, promotion.CHAMPION)
        if champion is not None and int(champion.version) == version:
            reason = f"v{version} is already champion (a retried task)"
            return policy.Decision(True, "already_champion", reason), champion
        scored, mismatch = (
            (None, "")
            if champion is None
            else rescore(champion.run_id, data()[1], champion.tags.get(versions.WEIGHTS_TAG))
        )
        if efficiency and scored:
            scored = {**scored, **_figures(champion.run_id)}
        named = {**challenger, "classes": data()[1].classes} if scored else challenger
        decision = policy.decide(cfg.register_, named, scored, mismatch)
        now = promotion.alias_version(client, name, promotion.CHAMPION)
        if (now and now.version) == (champion and champion.version):
            return decision, champion
    raise RuntimeError(f"the champion of {name} kept moving during this promotion; run it again")


def _privacy(tags: dict) -> dict:
    """The run's DP-SGD guarantee (`epsilon`, `delta`) or why it has none (`privacy_note`),
    as the policy reads them."""
    if "privacy.epsilon" in tags:
        return {"epsilon": float(tags["privacy.epsilon"]), "delta": float(tags["privacy.delta"])}
    return {"privacy_note": tags["privacy.note"]} if "privacy.note" in tags else {}


def _figures(run_id: str) -> dict:
    """Parameters, file bytes and MACs of a run's model (`efficiency.figures`)."""
    import tempfile
    from pathlib import Path

    from pipeline.tracking import weights
    from pipeline.training import efficiency

    with tempfile.TemporaryDirectory() as tmp:
        model, spec = weights.load_weights(run_id, keep=Path(tmp))
        return efficiency.figures(model, spec, next(Path(tmp).rglob("model.*")))


def _decided(client, name: str, version: int, run_id: str, decision, champion, cfg, by, data_md5):
    """Record the decision report (`data_md5`: the data both models were scored on); return the
    stage's small JSON result."""
    from datetime import UTC, datetime

    from pipeline.registry import policy, versions

    report = {
        "model": name,
        "version": version,
        "metric": cfg.register_.metric,
        "decision": decision.to_dict(),
        "champion_version": int(champion.version) if champion is not None else None,
        "data_md5": data_md5,
        "policy": cfg.register_.model_dump(),
        "by": by,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    versions.record_decision(client, name, version, run_id, report, policy.report_markdown(report))
    aliases = client.get_registered_model(name).aliases or {}
    return {
        "model_name": name,
        "version": version,
        "aliases": sorted(a for a, v in aliases.items() if int(v) == version),
        "promoted": decision.promote,
        "rule": decision.rule,
        "reason": decision.reason,
        **{k: v for k, v in decision.scores.items() if v is not None},
    }


def run(cfg: Config, settings: Settings, inputs: dict, ctx: RunContext) -> dict:
    """The graph's register stage: the evaluated run of the train stage's hand-off."""
    return register_stage(cfg, settings, inputs["train"]["run_id"], ctx)


def register_stage(
    cfg: Config, settings: Settings, run_id: str, ctx: RunContext | None = None
) -> dict:
    """Register the run's model (idempotent: a retry finds its version), alias it challenger,
    write its model card, and let the policy decide on champion; from a DVC experiment
    (`ctx.experiment`) it stays challenger unless register.promote_experiments. One promotion
    per model at a time; a version stays `pending` until all of this has happened. Returns
    {"model_name", "version", "aliases", "promoted", "rule", "reason", "challenger",
    "champion"}. Raises RegistryUnavailable when MLflow stays unreachable, LookupError for a
    deleted run."""
    from mlflow import MlflowClient

    from pipeline.registry import policy, promotion, versions
    from pipeline.tracking import lineage, server, store

    name, by = cfg.register_.model_name, (ctx or RunContext()).actor()
    with server.reachable(settings), versions.promotion_lock(settings, name):
        store.configure(settings, cfg.tracking.experiment)
        client = MlflowClient()
        run = store.active_run(client, run_id)
        metric = cfg.register_.metric
        if metric not in run.data.metrics:
            raise OutOfOrder(
                f"run {run_id} has no {metric}: it was not evaluated; run `pipeline evaluate` "
                f"(or `pipeline evaluate --run-id {run_id}`) first"
            )
        record = lineage.of_run(run_id)
        found = versions.find_version(client, name, run_id)
        private = {k: v for k, v in run.data.tags.items() if k.startswith("privacy.")}
        version = found or versions.create_version(
            client, name, run,
            {**lineage.tags(record), **private, metric: str(run.data.metrics[metric])},
        )  # fmt: skip
        v = int(version.version)
        spec = write_card(client, name, v, run_id, record)
        versions.tag_inputs(client, name, v, spec.input_contract())
        versions.tag_weights(client, name, v, run_id)
        promotion.move_alias(client, name, promotion.CHALLENGER, v, "newest candidate", by)
        data = current_data(cfg, settings)
        decision, champion = _gate(cfg, data, client, name, v, run.data.metrics, run_id)
        experiment = (ctx or RunContext()).experiment
        if experiment and not cfg.register_.promote_experiments:
            decision = policy.hold_experiment(decision, experiment, f"{name}/{v}")
        if decision.promote:
            promotion.crown(client, name, v, decision.reason, by)
        md5 = run.data.tags.get("data.md5")
        out = _decided(client, name, v, run_id, decision, champion, cfg, by, md5)
        versions.complete(client, name, v)
    return out


def write_card(client, name: str, version: int, run_id: str, record: dict | None = None):
    """Log version `version`'s model card (`model_card.md`) to its run: lineage (`record`, read
    when not given), config, metrics, tags, weights' spec and explanations (`pipeline
    explain`'s summary, when the run has one). Returns the spec."""
    from pipeline.registry import model_card
    from pipeline.tracking import lineage, weights

    run = client.get_run(run_id)
    _, spec = weights.load_weights(run_id)
    config = json.loads(Path(client.download_artifacts(run_id, "config.json")).read_text())
    card = model_card.render(
        name, version, record or lineage.of_run(run_id), config, run.data.metrics, spec,
        run.data.tags, _explained(client, run_id),
    )  # fmt: skip
    client.log_text(run_id, card, "model_card.md")
    return spec


def _explained(client, run_id: str) -> dict | None:
    """The run's explanation summary (`pipeline explain`), or None when it has none."""
    from pipeline.registry.model_card import EXPLAINED

    folder = EXPLAINED.rpartition("/")[0]
    if EXPLAINED not in {a.path for a in client.list_artifacts(run_id, folder)}:
        return None
    return json.loads(Path(client.download_artifacts(run_id, EXPLAINED)).read_text())


def promote_stage(
    cfg: Config,
    settings: Settings,
    ref: str,
    reason: str | None = None,
    force: bool = False,
    ctx: RunContext | None = None,
) -> dict:
    """Make a registered version champion by hand: the same policy, both models scored on the
    current data version, unless `force` (which needs a reason, kept in the history)."""
    from mlflow import MlflowClient

    from pipeline.registry import policy, promotion, versions
    from pipeline.tracking import server, store

    if force and not reason:
        raise ConfigError("--force needs --reason: it is recorded in the alias history")
    by = (ctx or RunContext()).actor()
    with server.reachable(settings):
        store.configure(settings, cfg.tracking.experiment)
        client = MlflowClient()
        version = versions.resolve(client, ref)
        name, v = version.name, int(version.version)
        versions.require_complete(version)
        with versions.promotion_lock(settings, name):
            if force:
                champion = promotion.alias_version(client, name, promotion.CHAMPION)
                decision = policy.Decision(True, "forced", f"forced: {reason}")
                md5 = None  # nothing was scored
            else:
                data = current_data(cfg, settings)
                md5, ds = data()
                sha256 = version.tags.get(versions.WEIGHTS_TAG)
                challenger, mismatch = rescore(version.run_id, ds, sha256)
                if mismatch:
                    raise LookupError(
                        f"{name} v{v} was built for other inputs or classes than data/ holds "
                        f"({mismatch}); check out its data version first (`pipeline lineage`), "
                        "or --force"
                    )
                decision, champion = _gate(cfg, data, client, name, v, challenger, version.run_id)
            if decision.promote:
                note = f" ({reason})" if reason and not force else ""
                promotion.crown(client, name, v, f"{decision.reason}{note}", by)
            return _decided(client, name, v, version.run_id, decision, champion, cfg, by, md5)


def rollback_stage(settings: Settings, name: str, reason: str) -> dict:
    """champion <- previous-champion, recorded in the alias history."""
    from pipeline.registry import promotion, versions
    from pipeline.tracking import server, store

    with server.reachable(settings):
        client = store.client(settings)
        versions.registered_model(client, name)  # before its lock file: only real models get one
        with versions.promotion_lock(settings, name):
            old, new = promotion.rollback(client, name, reason, RunContext().actor())
    return {"model_name": name, "champion": new, "previous-champion": old, "reason": reason}
