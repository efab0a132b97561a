"""Alias moves with a recorded history, and rollback.

Aliases: `challenger` = newest candidate, `champion` = serving model, `previous-champion` = the one
it replaced. MLflow keeps no alias history, so every move is also written as a registered-model
tag `alias_history.<ns>` holding {at, alias, version, previous, reason, by}.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from pipeline.registry.model_card import model_description

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


HISTORY_TAG = "alias_history."


def alias_version(client, name: str, alias: str):
    """The version `alias` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_run(client, name: str):
    """(champion version, its run, "") or (version or None, None, why there is none): "no
    champion yet", or its run was deleted from the store."""
    from pipeline.tracking import store

    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        return None, None, "no champion yet"
    run = store.run_or_none(client, champion.run_id)
    if run is None:
        return champion, None, f"the run of champion v{champion.version} was deleted"
    return champion, run, ""


def move_alias(client, name: str, alias: str, version: int, reason: str, by: str) -> None:
    """Point `alias` at `version` and append the move to the model's alias history, as one
    retriable step: a retry that finds the alias moved but the move unrecorded (the server was
    lost in between) writes the missing entry; one that finds both does nothing."""
    current = alias_version(client, name, alias)
    last = last_move(client, name, alias)
    if current is not None and int(current.version) == int(version):
        if last is not None and last["version"] == int(version):
            return
        previous = last["version"] if last is not None else None
        reason = f"{reason} (recorded by a retry: the alias had moved)"
    else:
        previous = int(current.version) if current is not None else None
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
    text = model_description(name, history(client, name))  # the history as a table in the UI
    client.update_registered_model(name, description=text)


def crown(client, name: str, version: int, reason: str, by: str) -> None:
    """Make `version` champion; the one it replaces becomes previous-champion. A retry after a
    cut finishes what the first try left (`move_alias`)."""
    current = alias_version(client, name, CHAMPION)
    if current is not None and int(current.version) != int(version):
        move_alias(client, name, PREVIOUS, int(current.version), f"replaced by v{version}", by)
    move_alias(client, name, CHAMPION, version, reason, by)


def rollback(client, name: str, reason: str, by: str) -> tuple[int, int]:
    """champion <- previous-champion (and the other way round, so a rollback can be undone).
    Returns (from version, to version). A rollback cut between its two moves (both aliases on
    the old champion) is finished by the retry: the target is where previous-champion
    pointed before."""
    champion = alias_version(client, name, CHAMPION)
    previous = alias_version(client, name, PREVIOUS)
    if champion is None or previous is None:
        raise LookupError(
            f"{name} has no {'champion' if champion is None else 'previous-champion'} to roll "
            "back from; `pipeline history` shows the alias moves so far"
        )
    old, new = int(champion.version), int(previous.version)
    if old == new:  # cut after previous-champion moved: where was it before?
        last = last_move(client, name, PREVIOUS)  # that move's entry, or the one before it
        new = last and (last["previous"] if last["version"] == old else last["version"])
        if not new or new == old:
            raise LookupError(
                f"{name}'s champion and previous-champion both point at v{old} and the history "
                "does not say where to roll back to; `pipeline promote NAME/VERSION --force "
                "--reason ...` sets the champion"
            )
    move_alias(client, name, PREVIOUS, old, f"rolled back from v{old}", by)
    move_alias(client, name, CHAMPION, new, f"rollback: {reason}", by)
    return old, new


def last_move(client, name: str, alias: str) -> dict | None:
    """The latest recorded move of `alias`, or None."""
    moves = [e for e in history(client, name) if e.get("alias") == alias]
    return moves[-1] if moves else None


def history(client, name: str) -> list[dict]:
    """Every recorded alias move of `name`, oldest first."""
    tags = client.get_registered_model(name).tags or {}
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(HISTORY_TAG)]
