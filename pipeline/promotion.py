"""Promotion: the policy that decides, alias moves with a recorded history, and rollback.

Aliases: `challenger` = newest candidate, `champion` = serving model, `previous-champion` = the one
it replaced. MLflow keeps no alias history, so every move is also written as a registered-model
tag `alias_history.<ns>` holding {at, alias, version, previous, reason, by}.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from pipeline.config import RegisterConfig

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
HISTORY_TAG = "alias_history."


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
    """Challenger and champion metrics (`evaluate.metrics`) on the same test data; champion None
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


def actor(airflow: dict | None = None) -> str:
    """Who or what moved an alias: the Airflow run, or the user at the host."""
    if airflow:
        return f"airflow:{airflow['dag_id']}/{airflow['run_id']} try {airflow['try_number']}"
    return f"cli:{getpass.getuser()}@{socket.gethostname()}"


def alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def move_alias(client, name: str, alias: str, version: int, reason: str, by: str) -> None:
    """Point `alias` at `version` and append the move to the model's alias history."""
    current = alias_version(client, name, alias)
    previous = int(current.version) if current is not None else None
    if previous == int(version):
        return
    client.set_registered_model_alias(name, alias, str(version))
    event = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "alias": alias,
        "version": int(version),
        "previous": previous,
        "reason": reason,
        "by": by,
    }
    client.set_registered_model_tag(name, f"{HISTORY_TAG}{time.time_ns()}", json.dumps(event))


def crown(client, name: str, version: int, reason: str, by: str) -> None:
    """Make `version` champion; the one it replaces becomes previous-champion."""
    current = alias_version(client, name, CHAMPION)
    if current is not None and int(current.version) == int(version):
        return
    if current is not None:
        move_alias(client, name, PREVIOUS, int(current.version), f"replaced by v{version}", by)
    move_alias(client, name, CHAMPION, version, reason, by)


def rollback(client, name: str, reason: str, by: str) -> tuple[int, int]:
    """champion <- previous-champion (and the other way round, so a rollback can be undone).
    Returns (from version, to version)."""
    champion = alias_version(client, name, CHAMPION)
    previous = alias_version(client, name, PREVIOUS)
    if champion is None or previous is None:
        raise LookupError(
            f"{name} has no {'champion' if champion is None else 'previous-champion'} to roll "
            "back from; `pipeline history` shows the alias moves so far"
        )
    old, new = int(champion.version), int(previous.version)
    move_alias(client, name, PREVIOUS, old, f"rolled back from v{old}", by)
    move_alias(client, name, CHAMPION, new, f"rollback: {reason}", by)
    return old, new


def history(client, name: str) -> list[dict]:
    """Every recorded alias move of `name`, oldest first."""
    tags = client.get_registered_model(name).tags or {}
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(HISTORY_TAG)]


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
