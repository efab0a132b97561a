"""register and promote: a version per run (idempotent), the policy moves champion."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Config, ConfigError
from pipeline.context import RunContext
from pipeline.errors import OutOfOrder
from pipeline.settings import Settings


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

    from pipeline.registry import gate, policy, promotion, versions
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
        data = gate.current_data(cfg, settings)
        decision, champion = gate.decide(cfg, data, client, name, v, run.data.metrics, run_id)
        experiment = (ctx or RunContext()).experiment
        if experiment and not cfg.register_.promote_experiments:
            decision = policy.hold_experiment(decision, experiment, f"{name}/{v}")
        if decision.promote:
            promotion.crown(client, name, v, decision.reason, by)
        md5 = run.data.tags.get("data.md5")
        out = gate.record(client, name, v, run_id, decision, champion, cfg, by, md5)
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

    from pipeline.registry import gate, policy, promotion, versions
    from pipeline.tracking import server, store
    from pipeline.training.models import CHECK_OUT_ITS_DATA, built_for_other

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
                data = gate.current_data(cfg, settings)
                md5, ds = data()
                sha256 = version.tags.get(versions.WEIGHTS_TAG)
                challenger, mismatch = gate.rescore(version.run_id, ds, sha256)
                if mismatch:
                    raise built_for_other(
                        f"{name} v{v}", mismatch, f"{CHECK_OUT_ITS_DATA}, or --force"
                    )
                decision, champion = gate.decide(
                    cfg, data, client, name, v, challenger, version.run_id
                )
            if decision.promote:
                note = f" ({reason})" if reason and not force else ""
                promotion.crown(client, name, v, f"{decision.reason}{note}", by)
            return gate.record(client, name, v, version.run_id, decision, champion, cfg, by, md5)


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
