"""The promotion policy as a table: floor, first model, incompatible champion, improvement,
per-class recall guard."""

import pytest

from pipeline.config import RegisterConfig
from pipeline.registry.policy import decide


def scores(acc: float, **recalls: float) -> dict:
    return {"test_accuracy": acc, **{f"test_recall.{k}": v for k, v in recalls.items()}}


POLICY = RegisterConfig(floor=0.9, min_improvement=0.01, max_recall_drop=0.05)


@pytest.mark.parametrize(
    ("challenger", "champion", "promote", "rule"),
    [
        (scores(0.85), None, False, "floor"),
        (scores(0.85), scores(0.80), False, "floor"),  # beating a weak champion is not enough
        (scores(0.95), None, True, "first_model"),
        (scores(0.955), scores(0.95), False, "improvement"),  # +0.005 < +0.01
        (scores(0.96), scores(0.95), True, "improvement"),  # +0.01 is enough
        (scores(0.97, a=0.99, b=0.80), scores(0.95, a=0.90, b=0.90), False, "recall_guard"),
        (scores(0.97, a=0.99, b=0.86), scores(0.95, a=0.90, b=0.90), True, "improvement"),
    ],
)
def test_policy_table(challenger, champion, promote, rule):
    decision = decide(POLICY, challenger, champion)
    assert (decision.promote, decision.rule) == (promote, rule), decision.reason
    assert decision.scores["challenger"] == challenger["test_accuracy"]


def test_reasons_name_the_numbers_and_the_failing_class():
    guard = decide(POLICY, scores(0.97, a=0.99, b=0.80), scores(0.95, a=0.90, b=0.90))
    assert "class b -0.1000" in guard.reason and "class a" not in guard.reason
    small = decide(POLICY, scores(0.955), scores(0.95))
    assert "0.9550" in small.reason and "0.9500" in small.reason and "+0.0100" in small.reason


def test_default_policy_promotes_ties_and_has_no_guard():
    default = RegisterConfig()
    assert decide(default, scores(0.95, a=0.5), scores(0.95, a=1.0)).promote
    assert not decide(default, scores(0.949), scores(0.95)).promote


def test_a_champion_for_other_classes_or_inputs_is_never_replaced_by_policy():
    mismatch = "model: 10 classes [0, 1, ...], data: 2 classes [cat, dog]"
    decision = decide(POLICY, scores(1.0), {}, mismatch)
    assert (decision.promote, decision.rule) == (False, "incompatible_champion")
    assert mismatch in decision.reason and "--force --reason" in decision.reason
    assert "register.model_name" in decision.reason
    assert decide(POLICY, scores(0.5), {}, mismatch).rule == "floor"  # below the floor first


def test_every_rule_is_described_in_the_operations_doc():
    from pipeline.registry.policy import RULES
    from tests.conftest import REPO

    doc = (REPO / "docs" / "operations.md").read_text()
    assert [r.__name__ for r in RULES if f"`{r.__name__}`" not in doc] == []


def test_the_report_shows_every_policy_setting_including_new_ones():
    from pipeline.registry.policy import _policy

    policy = RegisterConfig().model_dump()
    assert _policy(policy) == (
        "test_accuracy >= floor 0.9, >= champion +0 (efficiency off), per-class recall drop "
        "<= off; DVC experiments stay challenger"
    )
    efficient = _policy({**policy, "max_accuracy_drop": 0.005})
    assert "(or within 0.005 of the champion when >= 2x smaller and >= 1x fewer MACs)" in efficient
    added = _policy({**policy, "min_class_recall": 0.8})
    assert added.endswith(", min_class_recall 0.8; DVC experiments stay challenger")


def test_an_experiment_keeps_the_verdict_but_never_promotes():
    from pipeline.registry.policy import hold_experiment

    verdict = decide(POLICY, scores(0.96), scores(0.95))
    held = hold_experiment(verdict, "bushy-lake", "image-classifier/7")
    assert (held.promote, held.rule) == (False, "experiment")
    assert verdict.reason in held.reason and "pipeline promote image-classifier/7" in held.reason
    refused = decide(POLICY, scores(0.85), None)
    assert hold_experiment(refused, "bushy-lake", "image-classifier/7") == refused
