"""Scores on the untouched test split: accuracy, macro-F1, per-class precision and recall."""

from __future__ import annotations

import hashlib
import re

import numpy as np

# What MLflow takes in a metric name on every platform (it refuses ':' on Windows), and the
# suffix an escaped name ends in: a name of these characters that does not end so is kept.
_SAFE = re.compile(r"[\w.\- ]+")
_UNSAFE = re.compile(r"[^\w.\- ]")
_ESCAPED = re.compile(r".*-x[0-9a-f]{10}")
_MAX = 200  # MLflow keys hold 250 characters, with room for "test_precision."


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): rows are true classes, columns predicted classes;
    `labels` and `preds` are class indices (N,). scikit-learn's confusion_matrix."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, preds, labels=np.arange(num_classes))


def class_key(name: str) -> str:
    """The form of class `name` in metric names (`test_recall.<key>`): the name itself when
    MLflow takes it (letters, digits, `_ . -` and spaces, at most 200 characters); otherwise its
    characters MLflow refuses replaced by `_`, then `-x` and the first 10 hex digits of the
    name's MD5, so two names never share a key (`dog's toy` -> `dog_s toy-xd9a55b50b0`). Every
    output people read shows the name as written."""
    if _SAFE.fullmatch(name) and len(name) <= _MAX and not _ESCAPED.fullmatch(name):
        return name
    kept = _UNSAFE.sub("_", name)[: _MAX - 12]
    return f"{kept}-x{hashlib.md5(name.encode()).hexdigest()[:10]}"


def class_keys(classes: list[str]) -> dict[str, str]:
    """{metric key: class name} of `classes` (`class_key`)."""
    return {class_key(name): name for name in classes}


def metrics(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict[str, float]:
    """{"test_accuracy", "test_macro_f1", "test_precision.<key>", "test_recall.<key>"} (keys:
    `class_key`),
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
        out[f"test_precision.{class_key(name)}"] = float(precision[i])
        out[f"test_recall.{class_key(name)}"] = float(recall[i])
    return out
