"""Evaluation metrics on hand-checked cases (the promotion policy: test_promotion_policy.py)."""

import numpy as np
import pytest

from pipeline.training.scoring import confusion, metrics


def test_confusion_rows_are_true_classes():
    cm = confusion(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_metrics_hand_computed():
    m = metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), ["a", "b", "c"])
    assert m["test_accuracy"] == 0.5
    assert m["test_precision.a"] == 1.0 and m["test_recall.a"] == 0.5
    assert m["test_precision.b"] == pytest.approx(1 / 3) and m["test_recall.b"] == 1.0
    assert m["test_precision.c"] == 0.0 and m["test_recall.c"] == 0.0  # never predicted
    f1 = [2 * 1 * 0.5 / 1.5, 2 * (1 / 3) / (4 / 3), 0.0]
    assert m["test_macro_f1"] == pytest.approx(np.mean(f1))
