"""Scores on the untouched test split: accuracy, macro-F1, per-class precision and recall."""

from __future__ import annotations

import numpy as np


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): rows are true classes, columns predicted classes;
    `labels` and `preds` are class indices (N,). scikit-learn's confusion_matrix."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, preds, labels=np.arange(num_classes))


def metrics(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict[str, float]:
    """{"test_accuracy", "test_macro_f1", "test_precision.<class>", "test_recall.<class>"},
    fractions 0..1, from class indices `labels` and `preds` (N,); precision is 0 where a class
    is never predicted. scikit-learn's accuracy_score and precision_recall_fscore_support."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, labels=np.arange(len(classes)), zero_division=0
    )
    out = {
        "test_accuracy": float(accuracy_score(labels, preds)),
        "test_macro_f1": float(f1.mean()),
    }
    for i, name in enumerate(classes):
        out[f"test_precision.{name}"] = float(precision[i])
        out[f"test_recall.{name}"] = float(recall[i])
    return out
