"""Temperature scaling and the expected calibration error (training/calibration.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.training import calibration


def _overconfident(n: int = 4000, classes: int = 5, seed: int = 0):
    """Logits of a model right 70 % of the time that puts ~99 % on its answer."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    answer = np.where(rng.random(n) < 0.7, labels, rng.integers(0, classes, n))
    logits = rng.normal(0, 0.3, (n, classes))
    logits[np.arange(n), answer] += 6.0
    return logits, labels


def test_a_temperature_fitted_on_held_out_data_calibrates_new_data():
    logits, labels = _overconfident(seed=0)
    t = calibration.fit_temperature(logits, labels)
    assert t > 1.5  # over-confident: softened
    test_logits, test_labels = _overconfident(seed=1)
    before = calibration.reliability(calibration.softmax(test_logits), test_labels)
    after = calibration.reliability(calibration.softmax(test_logits, t), test_labels)
    assert before["ece"] > 0.2 and after["ece"] < 0.05
    assert calibration.nll(test_logits, test_labels, t) < calibration.nll(test_logits, test_labels)
    # the argmax, and so every prediction, is unchanged
    assert (calibration.softmax(test_logits, t).argmax(1) == test_logits.argmax(1)).all()


def test_an_under_confident_model_gets_a_temperature_below_one():
    logits, labels = _overconfident()
    logits[np.arange(len(labels)), labels] += 4.0  # now right almost always...
    t = calibration.fit_temperature(logits / 8, labels)  # ...with soft probabilities
    assert t < 1


def test_reliability_bins_count_every_image_and_weight_the_gaps():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.15, 0.85]])
    labels = np.array([0, 1, 0, 1])
    r = calibration.reliability(probs, labels, bins=10)
    assert sum(r["count"]) == 4 and r["count"][9] == 2 and r["count"][5] == 1
    assert r["accuracy"][9] == 0.5 and r["confidence"][9] == pytest.approx(0.95)
    # bins: 0.95 (acc 0.5) x2, 0.55 (acc 1) x1, 0.85 (acc 1) x1
    assert r["ece"] == pytest.approx((2 * 0.45 + 0.45 + 0.15) / 4)


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, "2", None, True])
def test_a_temperature_that_is_no_finite_positive_number_is_refused(value):
    with pytest.raises(ValueError, match="not a finite number > 0"):
        calibration.read_temperature({"temperature": value})


def test_held_out_data_without_mistakes_determines_no_temperature():
    logits, labels = _overconfident()
    right = logits.argmax(1) == labels  # keep only what the model gets right
    assert calibration.fit_temperature(logits[right], labels[right]) is None
