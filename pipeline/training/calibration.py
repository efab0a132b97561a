"""Calibrated probabilities by temperature scaling (Guo et al., "On Calibration of Modern Neural
Networks", ICML 2017): one scalar T > 0 divides the logits before the softmax. It is fitted on
held-out data by minimizing the negative log-likelihood, so the argmax, and with it every
prediction and accuracy, stays as it was. The expected calibration error (ECE) is the paper's:
15 equal-width confidence bins, the |accuracy - confidence| of each weighted by its share."""

from __future__ import annotations

import math

import numpy as np

BINS = 15
BOUNDS = (0.05, 20.0)  # the temperatures searched; past them the fit says the data is odd


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` (N,) under softmax(logits / T) (N x K)."""
    from scipy.special import log_softmax

    scaled = log_softmax(logits.astype(np.float64) / temperature, axis=1)
    return float(-scaled[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float | None:
    """T minimizing `nll` over `BOUNDS`, searched on log T with SciPy's bounded Brent method;
    None when the data does not determine T: held-out data the model gets all right keeps
    gaining likelihood as T falls to 0, and a minimum at a bound of the search says the same."""
    from scipy.optimize import minimize_scalar

    if (logits.argmax(1) == labels).all():
        return None
    low, high = (math.log(b) for b in BOUNDS)
    found = minimize_scalar(
        lambda log_t: nll(logits, labels, math.exp(log_t)),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    if min(found.x - low, high - found.x) < 0.01:
        return None
    return float(math.exp(found.x))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities (N x K, float32) of softmax(logits / T)."""
    from scipy.special import softmax as scipy_softmax

    return scipy_softmax(logits.astype(np.float64) / temperature, axis=1).astype(np.float32)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict:
    """Per confidence bin (equal width on 0..1): `count`, mean `confidence`, `accuracy`; and
    `ece`, their weighted |accuracy - confidence|. The data of a reliability diagram."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    conf = np.bincount(which, confidence, minlength=bins) / np.maximum(count, 1)
    acc = np.bincount(which, correct, minlength=bins) / np.maximum(count, 1)
    ece = float((count * np.abs(acc - conf)).sum() / max(len(labels), 1))
    return {
        "ece": ece,
        "count": count.tolist(),
        "confidence": conf.round(6).tolist(),
        "accuracy": acc.round(6).tolist(),
    }


def read_temperature(raw: dict) -> float:
    """The temperature of a `calibration.json`; ValueError unless it is a finite number > 0."""
    value = raw.get("temperature")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ValueError(f"calibration.json: temperature {value!r} is not a finite number > 0")
    return float(value)
