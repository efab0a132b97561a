"""Split-conformal prediction sets and the energy threshold (training/conformal.py), against
crepes, the reference library, and on exchangeable synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.training import calibration, conformal


def _data(n: int, seed: int, classes: int = 6, shift: float = 0.0):
    """Logits of a model right about 80 % of the time; `shift` moves them off the training data."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    answer = np.where(rng.random(n) < 0.8, labels, rng.integers(0, classes, n))
    logits = rng.normal(0, 1.0, (n, classes)) + shift
    logits[np.arange(n), answer] += rng.uniform(1, 5, n)
    return logits, labels


def test_the_sets_are_crepes_sets():
    from crepes import ConformalClassifier

    logits, labels = _data(1000, seed=0)  # alpha (n + 1) = 50.05: no tie between the rules
    test_logits, _ = _data(300, seed=1)
    scores = conformal.held_out_scores(logits, labels, 1.0)
    abstainer = conformal.Abstainer(scores, alpha=0.05, ood_rate=0.01)
    probs = calibration.softmax(test_logits)
    ours, _ = abstainer.decide(test_logits, probs, 1.0)
    reference = ConformalClassifier().fit(scores["nonconformity"].astype(np.float64))
    theirs = reference.predict_set(
        conformal.nonconformity(probs.astype(np.float64)), confidence=0.95, smoothing=False
    )
    assert (ours == theirs.astype(bool)).all()


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_sets_cover_the_true_class_at_least_one_minus_alpha_of_the_time(alpha):
    logits, labels = _data(2000, seed=2)
    test_logits, test_labels = _data(20000, seed=3)
    t = calibration.fit_temperature(logits, labels)
    abstainer = conformal.Abstainer(conformal.held_out_scores(logits, labels, t), alpha, 0.01)
    sets, reasons = abstainer.decide(test_logits, calibration.softmax(test_logits, t), t)
    coverage = sets[np.arange(len(test_labels)), test_labels].mean()
    assert 1 - alpha - 0.01 <= coverage <= 1 - alpha + 0.03  # valid, and not trivially so
    decided = [(r, s.sum()) for r, s in zip(reasons, sets, strict=True)]
    assert all((r is None) == (n == 1) for r, n in decided if r != "out_of_distribution")


def test_inputs_unlike_the_held_out_ones_are_out_of_distribution():
    logits, labels = _data(2000, seed=4)
    abstainer = conformal.Abstainer(conformal.held_out_scores(logits, labels, 1.0), 0.05, 0.01)
    same, _ = _data(5000, seed=5)
    far, _ = _data(5000, seed=6, shift=-4.0)  # every logit lower: high energy
    for data, low, high in ((same, 0.0, 0.02), (far, 0.95, 1.0)):
        _, reasons = abstainer.decide(data, calibration.softmax(data), 1.0)
        rate = np.mean([r == "out_of_distribution" for r in reasons])
        assert low <= rate <= high


def test_too_few_held_out_images_for_alpha_are_refused():
    logits, labels = _data(18, seed=7)
    scores = conformal.held_out_scores(logits, labels, 1.0)
    with pytest.raises(ValueError, match="18 held-out images cannot give sets of coverage"):
        conformal.Abstainer(scores, alpha=0.05, ood_rate=0.01)
    conformal.Abstainer(scores, alpha=0.1, ood_rate=0.1)  # 18 >= 1 / 0.1 - 1


def test_too_few_held_out_images_for_ood_rate_are_refused():
    logits, labels = _data(143, seed=8)
    scores = conformal.held_out_scores(logits, labels, 1.0)
    with pytest.raises(ValueError, match="143 held-out images cannot place an energy threshold"):
        conformal.Abstainer(scores, alpha=0.05, ood_rate=0.001)
