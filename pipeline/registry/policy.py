"""The promotion policy, pure: challenger and champion metrics in, a decision with its rule and
reason out; and the decision report as people read it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.config import RegisterConfig
from pipeline.training.scoring import class_keys


@dataclass(frozen=True)
class Decision:
    promote: bool
    rule: str  # a rule of RULES, or improvement | already_champion | forced | experiment
    reason: str
    scores: dict = field(default_factory=dict)  # challenger / champion: the policy metric

    def to_dict(self) -> dict:
        return asdict(self)


def decide(
    policy: RegisterConfig, challenger: dict, champion: dict | None, incompatible: str = ""
) -> Decision:
    """Challenger and champion metrics (`scoring.metrics`, fractions 0..1) on the same test
    data, the challenger's with its "classes" (names, so reasons say them as written);
    champion None when there is none. `incompatible` says how the champion's classes or
    input shape differ from the challenger's. The first rule of `RULES` that gives a verdict
    decides; a challenger no rule stops is promoted for its improvement."""
    metric = policy.metric
    scores = {
        "challenger": challenger[metric],
        "champion": champion.get(metric) if champion else None,
        **{f"challenger_{k}": challenger[k] for k in FIGURES + MEASURED if k in challenger},
        **{f"challenger_{k}": challenger[k] for k in PRIVACY if k in challenger},
        **{f"champion_{k}": champion[k] for k in FIGURES if champion and k in champion},
    }
    for rule in RULES:
        verdict = rule(policy, challenger, champion, incompatible)
        if verdict is not None:
            return Decision(verdict[0], rule.__name__, verdict[1], scores)
    gain = challenger[metric] - champion[metric]
    if gain < policy.min_improvement:  # `improvement` let it through: it is efficient
        return Decision(True, "efficiency", efficient(policy, challenger, champion)[1], scores)
    return Decision(
        True,
        "improvement",
        f"{metric} {challenger[metric]:.4f} vs champion's {champion[metric]:.4f} on this data: "
        f"{gain:+.4f} >= the required {policy.min_improvement:+.4f}",
        scores,
    )


# Each rule: (policy, challenger, champion, incompatible) -> (promote, reason), or None to leave
# the decision to the next rule. Its name is the rule the decision report names.
def floor(policy, challenger, champion, incompatible):
    """A model below the floor is never champion."""
    score = challenger[policy.metric]
    if score < policy.floor:
        return False, f"{policy.metric} {score:.4f} is below the floor {policy.floor:.4f}"
    return None


def incompatible_champion(policy, challenger, champion, incompatible):
    """A champion with other classes or inputs serves other callers: never replaced by policy
    (only `pipeline promote --force --reason`)."""
    if not incompatible:
        return None
    return False, (
        f"the champion takes other inputs or classes ({incompatible}); callers of the "
        "champion would break, so it stays. Register this model under its own name "
        "(register.model_name), or replace the champion on purpose with `pipeline promote "
        "NAME/VERSION --force --reason ...`"
    )


# DP-SGD's guarantee of the challenger (its run's privacy.* tags), or a note on why it has none.
PRIVACY = ("epsilon", "delta", "privacy_note")


def privacy(policy, challenger, champion, incompatible):
    """With `max_epsilon`, refused when the challenger's DP-SGD epsilon is above it, or when
    it has none (trained without train.privacy, or made from a private teacher by using the
    data again outside DP-SGD)."""
    if policy.max_epsilon is None:
        return None
    epsilon = challenger.get("epsilon")
    if epsilon is None:
        why = challenger.get("privacy_note") or "trained without train.privacy"
        return False, (
            f"no epsilon: {why}; register.max_epsilon {policy.max_epsilon:g} asks for a model "
            "trained with DP-SGD"
        )
    if epsilon > policy.max_epsilon:
        return False, (
            f"epsilon {epsilon:.3g} (delta {challenger['delta']:.3g}) is above "
            f"register.max_epsilon {policy.max_epsilon:g}: more noise (train.privacy."
            "noise_multiplier) or fewer epochs spend less"
        )
    return None


def first_model(policy, challenger, champion, incompatible):
    if champion is not None:
        return None
    score = challenger[policy.metric]
    return (
        True,
        f"first model meeting the floor ({policy.metric} {score:.4f} >= {policy.floor:.4f})",
    )


def improvement(policy, challenger, champion, incompatible):
    """Refused when it does not beat the champion by `min_improvement` (0: ties promote),
    unless the efficiency option is on (`max_accuracy_drop`) and it is `efficient`."""
    metric = policy.metric
    gain = challenger[metric] - champion[metric]
    if gain >= policy.min_improvement:
        return None
    short = (
        f"{metric} {challenger[metric]:.4f} vs champion's {champion[metric]:.4f} on this data: "
        f"{gain:+.4f} < the required {policy.min_improvement:+.4f}"
    )
    if policy.max_accuracy_drop is None:
        return False, short
    passes, why = efficient(policy, challenger, champion)
    return None if passes else (False, f"{short}; and {why}")


# What a model costs (`efficiency.figures`): deterministic, so the policy may gate on them.
FIGURES = ("params", "model_bytes", "macs")
# Measured on a shared machine: reported beside the decision, never gated on.
MEASURED = ("latency_p50_ms", "throughput", "teacher_latency_p50_ms", "teacher_throughput")


def efficient(policy, challenger, champion) -> tuple[bool, str]:
    """The efficiency option: within `max_accuracy_drop` of the champion's metric, at least
    `min_size_ratio` x smaller in parameters or in file bytes, and `min_macs_ratio` x fewer
    MACs. (passes, the figures in words)."""
    metric = policy.metric
    drop = champion[metric] - challenger[metric]
    missing = [k for k in FIGURES if k not in challenger or k not in champion]
    if missing:
        return False, f"efficiency not judged: no {', '.join(missing)} figures"
    ratio = {k: champion[k] / max(challenger[k], 1.0) for k in FIGURES}
    words = (
        f"efficiency: {metric} drop {drop:+.4f} (allowed {policy.max_accuracy_drop:.4f}); "
        f"{ratio['params']:.2f}x fewer parameters ({challenger['params']:,.0f} vs "
        f"{champion['params']:,.0f}), {ratio['model_bytes']:.2f}x fewer bytes "
        f"({challenger['model_bytes']:,.0f} vs {champion['model_bytes']:,.0f}), size needed "
        f"{policy.min_size_ratio:g}x; {ratio['macs']:.2f}x fewer MACs "
        f"({challenger['macs']:,.0f} vs {champion['macs']:,.0f}), needed "
        f"{policy.min_macs_ratio:g}x"
    )
    passes = (
        drop <= policy.max_accuracy_drop
        and max(ratio["params"], ratio["model_bytes"]) >= policy.min_size_ratio
        and ratio["macs"] >= policy.min_macs_ratio
    )
    return passes, words


def recall_guard(policy, challenger, champion, incompatible):
    """Refused when any class's recall drops more than `max_recall_drop` (null: off)."""
    if policy.max_recall_drop is None:
        return None
    names = class_keys(challenger.get("classes", []))  # metric key -> the class as named
    keys = [k.removeprefix("test_recall.") for k in champion if k.startswith("test_recall.")]
    drops = {
        names.get(k, k): champion[f"test_recall.{k}"] - challenger.get(f"test_recall.{k}", 0.0)
        for k in keys
    }
    worst = {c: d for c, d in drops.items() if d > policy.max_recall_drop}
    if not worst:
        return None
    listed = ", ".join(f"class {c} -{d:.4f}" for c, d in sorted(worst.items()))
    return False, f"recall dropped more than {policy.max_recall_drop:.4f} vs the champion: {listed}"


RULES = (floor, incompatible_champion, privacy, first_model, improvement, recall_guard)


def hold_experiment(decision: Decision, experiment: str, ref: str) -> Decision:
    """An experiment is not a release: the verdict of a model from `dvc exp run` stands in its
    report, but it stays challenger. `ref` ("NAME/VERSION") is how to release it by hand."""
    if not decision.promote:
        return decision
    reason = (
        f"{decision.reason}; but it comes from DVC experiment {experiment}, and an experiment "
        f"never moves champion: release it with `pipeline promote {ref}`, or run the "
        "experiment with register.promote_experiments=true"
    )
    return Decision(False, "experiment", reason, decision.scores)


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
        *_costs(scores),
        *_privacy_line(scores),
        f"- scored on data version `{report['data_md5']}` (both models, same test split)"
        if report["data_md5"]
        else "- not scored: forced past the policy",
        f"- policy: {_policy(report['policy'])}",
        f"- triggered by: {report['by']}",
        f"- at: {report['at']}",
    ]
    return "\n".join(lines) + "\n"


def _costs(scores: dict) -> list[str]:
    """The models' costs: size figures (gated on by the efficiency option) and the measured
    speed (reported only), when they were taken."""
    if not any(f"challenger_{k}" in scores for k in FIGURES):
        return []

    def cell(who: str, key: str, form: str) -> str:
        value = scores.get(f"{who}_{key}")
        return "-" if value is None else format(value, form)

    # The champion's figures are taken at decision time only by the efficiency option.
    shown = [w for w in ("challenger", "champion") if any(f"{w}_{k}" in scores for k in FIGURES)]
    rows = [
        f"| {who} | {cell(who, 'params', ',.0f')} | {cell(who, 'model_bytes', ',.0f')} | "
        f"{cell(who, 'macs', ',.0f')} |"
        for who in shown
    ]
    lines = ["| | parameters | file bytes | MACs per image |", "|---|---|---|---|", *rows, ""]
    if "challenger_latency_p50_ms" in scores:
        lines += [
            "Measured beside its teacher on one CPU, reported, not gated on: latency p50 at "
            f"batch 1 {cell('challenger', 'latency_p50_ms', '.3f')} ms (teacher "
            f"{cell('challenger', 'teacher_latency_p50_ms', '.3f')} ms), throughput at batch "
            f"256 {cell('challenger', 'throughput', ',.0f')} images/s (teacher "
            f"{cell('challenger', 'teacher_throughput', ',.0f')}).",
            "",
        ]
    return lines


def _privacy_line(scores: dict) -> list[str]:
    """The challenger's DP-SGD guarantee, or why it has none."""
    if "challenger_epsilon" in scores:
        return [
            f"- privacy: epsilon {scores['challenger_epsilon']:.3g} at delta "
            f"{scores['challenger_delta']:.3g} (DP-SGD)"
        ]
    if "challenger_privacy_note" in scores:
        return [f"- privacy: {scores['challenger_privacy_note']}"]
    return []


def _policy(p: dict) -> str:
    guard = "off" if p["max_recall_drop"] is None else f"{p['max_recall_drop']:g}"
    shown = {"model_name", "metric", "floor", "min_improvement", "max_recall_drop"}
    shown |= {"promote_experiments", "max_accuracy_drop", "min_size_ratio", "min_macs_ratio"}
    shown |= {"max_epsilon"}
    more = "".join(f", {key} {value}" for key, value in p.items() if key not in shown)
    experiments = "may promote" if p.get("promote_experiments") else "stay challenger"
    drop = p.get("max_accuracy_drop")
    efficiency = (
        "efficiency off"
        if drop is None
        else f"or within {drop:g} of the champion when >= {p['min_size_ratio']:g}x smaller and "
        f">= {p['min_macs_ratio']:g}x fewer MACs"
    )
    epsilon = p.get("max_epsilon")
    private = "" if epsilon is None else f", DP-SGD epsilon <= {epsilon:g}"
    return (
        f"{p['metric']} >= floor {p['floor']:g}, >= champion {p['min_improvement']:+g} "
        f"({efficiency}), per-class recall drop <= {guard}{private}{more}; DVC experiments "
        f"{experiments}"
    )  # `more`: settings of rules added later


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
