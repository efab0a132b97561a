"""The promotion gate: both models scored on the same data, the policy's decision taken again
if another promotion moved the champion meanwhile, and the decision recorded. register and
promote call it under the registry's lock (`versions.promotion_lock`); the rules themselves are
`policy.RULES`."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from pipeline.config import Config
from pipeline.data import Dataset, check_data, read_dataset
from pipeline.settings import Settings


def current_data(cfg: Config, settings: Settings) -> Callable[[], tuple[str, Dataset]]:
    """(data md5, dataset) of data/, checked against data.dvc on the first call only: a promotion
    scores two models on it, or none."""

    @cache
    def load() -> tuple[str, Dataset]:
        md5 = check_data(cfg.base.dataset, settings.root, settings.data_dir)["data_md5"]
        return md5, read_dataset(settings.data_dir, mmap=True)

    return load


def rescore(run_id: str, ds: Dataset, sha256: str | None = None) -> tuple[dict, str]:
    """A model's metrics on `ds`'s test split (a fair comparison even when the data changed), or
    ({}, how it differs) when it was built for other image shapes or classes. `sha256`: the
    registered digest its weights must have (`load_weights`)."""
    from pipeline.tracking import weights
    from pipeline.training import inference, scoring

    model, spec = weights.load_weights(run_id, sha256=sha256)
    mismatch = spec.mismatch(ds)
    if mismatch:
        return {}, mismatch
    scores = scoring.metrics(ds.test.labels, inference.predict(model, ds.test.images), ds.classes)
    return scores, ""


def decide(cfg: Config, data, client, name: str, version: int, challenger: dict, run_id: str):
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


def record(client, name: str, version: int, run_id: str, decision, champion, cfg, by, data_md5):
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
