"""The promotion policy as a table: floor, first model, incompatible champion, improvement,
efficiency, per-class recall guard."""

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


def sized(acc: float, params: float, model_bytes: float, macs: float, **recalls) -> dict:
    recalls = recalls or {"a": 0.99, "b": 0.98}
    return {**scores(acc, **recalls), "params": params, "model_bytes": model_bytes, "macs": macs}


EFFICIENT = RegisterConfig(floor=0.9, max_accuracy_drop=0.005, min_size_ratio=3, min_macs_ratio=2)
TEACHER = sized(0.99, 100_000, 400_000, 2_000_000, a=0.99, b=0.99)


@pytest.mark.parametrize(
    ("challenger", "promote", "rule", "said"),
    [
        # within 0.005, 4x fewer parameters and bytes, 4x fewer MACs
        (sized(0.986, 25_000, 100_000, 500_000), True, "efficiency", "4.00x fewer parameters"),
        # int8: same parameters and MACs, 4x fewer bytes -> size by bytes; MACs not fewer
        (sized(0.988, 100_000, 100_000, 2_000_000), False, "improvement", "1.00x fewer MACs"),
        (sized(0.984, 25_000, 100_000, 500_000), False, "improvement", "drop +0.0060"),
        (sized(0.986, 50_000, 200_000, 500_000), False, "improvement", "size needed 3x"),
        (sized(0.991, 90_000, 360_000, 2_000_000), True, "improvement", "+0.0010"),  # plain win
        (sized(0.986, 25_000, 100_000, 500_000, a=0.9, b=0.99), False, "recall_guard", "class a"),
        (sized(0.8, 1_000, 1_000, 1_000), False, "floor", "below the floor"),
        (scores(0.986, a=0.99, b=0.99), False, "improvement", "no params, model_bytes, macs"),
    ],
)
def test_the_efficiency_option_trades_a_little_accuracy_for_size(challenger, promote, rule, said):
    from pipeline.registry.policy import report_markdown

    policy = EFFICIENT.model_copy(update={"max_recall_drop": 0.05})
    decision = decide(policy, challenger, TEACHER)
    assert (decision.promote, decision.rule) == (promote, rule), decision.reason
    assert said in decision.reason
    report = {
        "model": "m", "version": 2, "metric": "test_accuracy", "decision": decision.to_dict(),
        "champion_version": 1, "data_md5": "abc", "policy": policy.model_dump(), "by": "me",
        "at": "now",
    }  # fmt: skip
    text = report_markdown(report)
    if "params" in challenger:  # the report shows both models' costs
        assert f"| challenger | {challenger['params']:,.0f} |" in text
        assert f"| champion | {TEACHER['params']:,.0f} |" in text


def test_without_the_option_a_smaller_but_less_accurate_model_is_refused_as_before():
    decision = decide(RegisterConfig(), sized(0.986, 25_000, 100_000, 500_000), TEACHER)
    assert (decision.promote, decision.rule) == (False, "improvement")
    assert "efficiency" not in decision.reason


PRIVATE = RegisterConfig(floor=0.9, max_epsilon=8.0)


@pytest.mark.parametrize(
    ("privacy", "champion", "promote", "rule", "said"),
    [
        ({"epsilon": 3.2, "delta": 1e-5}, None, True, "first_model", ""),
        ({"epsilon": 3.2, "delta": 1e-5}, scores(0.95), True, "improvement", ""),
        (
            {"epsilon": 9.5, "delta": 1e-5},
            None,
            False,
            "privacy",
            "epsilon 9.5 (delta 1e-05) is above register.max_epsilon 8",
        ),  # fmt: skip
        ({}, scores(0.90), False, "privacy", "no epsilon: trained without train.privacy"),
        (
            {
                "privacy_note": "made by distill from a private teacher (m/1, epsilon 3.2 at delta "
                "1e-05), but ...: no epsilon of its own"
            },
            None,
            False,
            "privacy",
            "no epsilon: made by distill from a private teacher",
        ),  # fmt: skip
    ],
)
def test_the_epsilon_gate_refuses_above_the_bound_and_without_an_epsilon(
    privacy, champion, promote, rule, said
):
    decision = decide(PRIVATE, {**scores(0.96), **privacy}, champion)
    assert (decision.promote, decision.rule) == (promote, rule), decision.reason
    assert said in decision.reason
    if "epsilon" in privacy:  # the report names it, promoted or not
        assert decision.scores["challenger_epsilon"] == privacy["epsilon"]
    off = decide(RegisterConfig(floor=0.9), {**scores(0.96), **privacy}, champion)
    assert off.rule != "privacy"  # without max_epsilon nothing is asked


def test_the_report_names_the_epsilon_or_why_there_is_none():
    from pipeline.registry.policy import report_markdown

    def report(privacy: dict) -> str:
        d = decide(PRIVATE, {**scores(0.96), **privacy}, None)
        return report_markdown({"model": "m", "version": 2, "metric": "test_accuracy",
                                "decision": d.to_dict(), "champion_version": None,
                                "data_md5": "abc", "policy": PRIVATE.model_dump(), "by": "t",
                                "at": "2026-12-01T00:00:00+00:00"})  # fmt: skip

    assert "- privacy: epsilon 3.2 at delta 1e-05 (DP-SGD)" in report(
        {"epsilon": 3.2, "delta": 1e-5}
    )
    assert "DP-SGD epsilon <= 8" in report({})
    assert "- privacy: made by distill" in report({"privacy_note": "made by distill ..."})
