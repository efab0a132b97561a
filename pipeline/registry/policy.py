"""The promotion policy, pure: challenger and champion metrics in, a decision with its rule and
reason out; and the decision report as people read it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.config import RegisterConfig


@dataclass(frozen=True)
class Decision:
    promote: bool
    rule: str  # floor | first_model | incompatible_champion | improvement | recall_guard | forced
    reason: str
    scores: dict = field(default_factory=dict)  # challenger / champion: the policy metric

    def to_dict(self) -> dict:
        return asdict(self)


def decide(
    policy: RegisterConfig, challenger: dict, champion: dict | None, incompatible: str = ""
) -> Decision:
    """Challenger and champion metrics (`scoring.metrics`) on the same test data; champion None
    when there is none. `incompatible` says how the champion's classes or input shape differ
    from the challenger's: such a model serves other callers, so it never replaces the champion
    by policy (only `pipeline promote --force --reason`)."""
    metric = policy.metric
    score = challenger[metric]
    scores = {"challenger": score, "champion": champion.get(metric) if champion else None}
    if score < policy.floor:
        return Decision(
            False, "floor", f"{metric} {score:.4f} is below the floor {policy.floor:.4f}", scores
        )
    if incompatible:
        return Decision(
            False,
            "incompatible_champion",
            f"the champion takes other inputs or classes ({incompatible}); callers of the "
            "champion would break, so it stays. Register this model under its own name "
            "(register.model_name), or replace the champion on purpose with `pipeline promote "
            "NAME/VERSION --force --reason ...`",
            scores,
        )
    if champion is None:
        return Decision(
            True,
            "first_model",
            f"first model meeting the floor ({metric} {score:.4f} >= {policy.floor:.4f})",
            scores,
        )
    gain = score - champion[metric]
    if gain < policy.min_improvement:
        return Decision(
            False,
            "improvement",
            f"{metric} {score:.4f} vs champion's {champion[metric]:.4f} on this data: "
            f"{gain:+.4f} < the required {policy.min_improvement:+.4f}",
            scores,
        )
    if policy.max_recall_drop is not None:
        drops = {
            key.removeprefix("test_recall."): champion[key] - challenger.get(key, 0.0)
            for key in champion
            if key.startswith("test_recall.")
        }
        worst = {c: d for c, d in drops.items() if d > policy.max_recall_drop}
        if worst:
            listed = ", ".join(f"class {c} -{d:.4f}" for c, d in sorted(worst.items()))
            return Decision(
                False,
                "recall_guard",
                f"recall dropped more than {policy.max_recall_drop:.4f} vs the champion: {listed}",
                scores,
            )
    return Decision(
        True,
        "improvement",
        f"{metric} {score:.4f} vs champion's {champion[metric]:.4f} on this data: "
        f"{gain:+.4f} >= the required {policy.min_improvement:+.4f}",
        scores,
    )


def report_markdown(report: dict) -> str:
    """The decision report as people read it (the JSON next to it holds the same)."""
    d, scores = report["decision"], report["decision"]["scores"]
    champion = report.get("champion_version")
    lines = [
        f"# Promotion decision: {report['model']} v{report['version']}",
        "",
        f"**{'PROMOTED to champion' if d['promote'] else 'not promoted'}** (rule: `{d['rule']}`)",
        "",
        d["reason"],
        "",
        "| | version | " + report["metric"] + " |",
        "|---|---|---|",
        f"| challenger | v{report['version']} | {_fmt(scores.get('challenger'))} |",
        f"| champion | {f'v{champion}' if champion else '-'} | {_fmt(scores.get('champion'))} |",
        "",
        f"- scored on data version `{report['data_md5']}` (both models, same test split)"
        if report["data_md5"]
        else "- not scored: forced past the policy",
        f"- policy: {_policy(report['policy'])}",
        f"- triggered by: {report['by']}",
        f"- at: {report['at']}",
    ]
    return "\n".join(lines) + "\n"


def _policy(p: dict) -> str:
    guard = "off" if p["max_recall_drop"] is None else f"{p['max_recall_drop']:g}"
    return (
        f"{p['metric']} >= floor {p['floor']:g}, >= champion {p['min_improvement']:+g}, "
        f"per-class recall drop <= {guard}"
    )


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
