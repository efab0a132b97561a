"""Alias moves on a real MLflow registry (SQLite): champion, previous-champion, rollback and the
recorded history that MLflow itself does not keep."""

import pytest
from mlflow import MlflowClient

from pipeline.registry import promotion
from pipeline.registry.promotion import CHAMPION, PREVIOUS

NAME = "m"


@pytest.fixture
def client(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=(tmp_path / "model").as_uri())
    return client


def _aliases(client) -> dict:
    return {a: int(v) for a, v in client.get_registered_model(NAME).aliases.items()}


def test_crowning_keeps_the_replaced_champion_as_previous(client):
    promotion.crown(client, NAME, 1, "first", "tester")
    assert _aliases(client) == {CHAMPION: 1}
    promotion.crown(client, NAME, 3, "better", "tester")
    assert _aliases(client) == {CHAMPION: 3, PREVIOUS: 1}
    promotion.crown(client, NAME, 3, "again", "tester")  # a retry moves nothing
    assert len(promotion.history(client, NAME)) == 3


def test_rollback_swaps_champion_and_previous_and_can_be_undone(client):
    promotion.crown(client, NAME, 1, "first", "tester")
    promotion.crown(client, NAME, 2, "better", "tester")
    assert promotion.rollback(client, NAME, "v2 misclassifies 7s", "oncall") == (2, 1)
    assert _aliases(client) == {CHAMPION: 1, PREVIOUS: 2}
    assert promotion.rollback(client, NAME, "false alarm", "oncall") == (1, 2)
    assert _aliases(client) == {CHAMPION: 2, PREVIOUS: 1}


def test_rollback_without_a_previous_champion_says_so(client):
    with pytest.raises(LookupError, match="no champion"):
        promotion.rollback(client, NAME, "why", "oncall")
    promotion.crown(client, NAME, 1, "first", "tester")
    with pytest.raises(LookupError, match="no previous-champion"):
        promotion.rollback(client, NAME, "why", "oncall")


def test_history_records_who_moved_which_alias_when_and_why(client):
    promotion.crown(client, NAME, 1, "first model meeting the floor", "airflow:dag/run try 1")
    promotion.crown(client, NAME, 2, "better by 0.01", "airflow:dag/run2 try 1")
    promotion.rollback(client, NAME, "bad labels in v2's data", "cli:oncall@host")
    events = [(e["alias"], e["version"], e["previous"]) for e in promotion.history(client, NAME)]
    assert events == [
        (CHAMPION, 1, None),
        (PREVIOUS, 1, None),
        (CHAMPION, 2, 1),
        (PREVIOUS, 2, 1),
        (CHAMPION, 1, 2),
    ]
    last = promotion.history(client, NAME)[-1]
    assert last["reason"] == "rollback: bad labels in v2's data" and last["by"] == "cli:oncall@host"
    assert last["at"].endswith("+00:00")


def test_the_models_description_shows_the_history_as_a_table_newest_first(client):
    promotion.crown(client, NAME, 1, "first", "tester")
    promotion.crown(client, NAME, 2, "better | by a lot", "tester")
    promotion.rollback(client, NAME, "v2 misreads 7s", "on-call")
    text = client.get_registered_model(NAME).description
    rows = [line for line in text.splitlines() if line.startswith("| 2")]  # "| 2026-..."
    assert len(rows) == len(promotion.history(client, NAME)) == 5
    assert "rollback: v2 misreads 7s" in rows[0] and "| on-call |" in rows[0]
    assert "better \\| by a lot" in text  # a pipe in a reason does not break the table
    assert rows[-1].split(" | ")[1:4] == ["`champion`", "v1", "-"]


class _ServerLost(Exception):
    pass


def _lose_server_after_the_alias_moves(client, monkeypatch):
    """The next alias move reaches MLflow; its history entry does not (the server died)."""
    real = client.set_registered_model_alias

    def move_then_die(*args):
        real(*args)
        monkeypatch.undo()
        raise _ServerLost("connection refused")

    monkeypatch.setattr(client, "set_registered_model_alias", move_then_die)


def test_a_promotion_cut_between_the_alias_move_and_its_history_is_completed_by_the_retry(
    client, monkeypatch
):
    promotion.crown(client, NAME, 1, "first", "tester")
    # crown(2) moves previous-champion first: cut after the champion's move itself
    real_move = promotion.move_alias

    def second_move_dies(client_, name, alias, version, reason, by):
        if alias == CHAMPION:
            _lose_server_after_the_alias_moves(client_, monkeypatch)
        return real_move(client_, name, alias, version, reason, by)

    monkeypatch.setattr(promotion, "move_alias", second_move_dies)
    with pytest.raises(_ServerLost):
        promotion.crown(client, NAME, 2, "better", "tester")
    monkeypatch.undo()
    assert _aliases(client) == {CHAMPION: 2, PREVIOUS: 1}  # moved, but not yet recorded
    promotion.crown(client, NAME, 2, "better", "tester")  # the retried register
    events = [(e["alias"], e["version"], e["previous"]) for e in promotion.history(client, NAME)]
    assert events == [(CHAMPION, 1, None), (PREVIOUS, 1, None), (CHAMPION, 2, 1)]
    assert "recorded by a retry" in promotion.history(client, NAME)[-1]["reason"]
    promotion.crown(client, NAME, 2, "better", "tester")  # a third try adds nothing
    assert len(promotion.history(client, NAME)) == 3


def test_a_rollback_cut_between_its_two_moves_is_finished_by_the_retry(client, monkeypatch):
    promotion.crown(client, NAME, 1, "first", "tester")
    promotion.crown(client, NAME, 2, "better", "tester")
    _lose_server_after_the_alias_moves(client, monkeypatch)  # previous-champion <- 2, then lost
    with pytest.raises(_ServerLost):
        promotion.rollback(client, NAME, "v2 misclassifies 7s", "oncall")
    assert _aliases(client) == {CHAMPION: 2, PREVIOUS: 2}
    assert promotion.rollback(client, NAME, "v2 misclassifies 7s", "oncall") == (2, 1)
    assert _aliases(client) == {CHAMPION: 1, PREVIOUS: 2}
    events = [(e["alias"], e["version"], e["previous"]) for e in promotion.history(client, NAME)]
    assert events[-2:] == [(PREVIOUS, 2, 1), (CHAMPION, 1, 2)]
