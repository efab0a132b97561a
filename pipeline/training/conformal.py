"""Knowing when to say "unknown": split-conformal prediction sets and an out-of-distribution
score, both set on held-out data.

- Conformal prediction (Vovk et al. 2005; the split form as in Angelopoulos & Bates, "A Gentle
  Introduction to Conformal Prediction", 2021): a class is in an image's prediction set when its
  nonconformity, 1 - its calibrated probability, is no larger than enough of the validation
  images' nonconformities for their true class. The set holds the true class with probability
  at least 1 - alpha for images exchangeable with the validation split. The set is read off
  one quantile of those (`quantile`), which gives crepes' sets exactly
  (tests/unit/test_conformal.py checks against it) at a cost independent of the split's size,
  where crepes' p-values compare every class of every image with the whole split.
- Energy (Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020): -T logsumexp(
  logits / T), higher for inputs unlike the training data. The threshold is the validation
  split's (1 - ood_rate) quantile, so about `ood_rate` of in-distribution images are flagged.

An image is answered "unknown" when its set is not exactly one class (`several_classes`,
`no_class`) or its energy is over the threshold (`out_of_distribution`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNKNOWN = "unknown"


def nonconformity(probs: np.ndarray) -> np.ndarray:
    """N x K: 1 - each class's probability (the LAC score)."""
    return 1.0 - probs


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """N: -T logsumexp(logits / T); higher is less like the training data."""
    from scipy.special import logsumexp

    return -temperature * logsumexp(logits.astype(np.float64) / temperature, axis=1)


def held_out_scores(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """What a server needs from the validation split: each image's nonconformity for its true
    class and its energy (float32 arrays, N each)."""
    from pipeline.training.calibration import softmax

    probs = softmax(logits, temperature)
    return {
        "nonconformity": nonconformity(probs)[np.arange(len(labels)), labels].astype(np.float32),
        "energy": energy(logits, temperature).astype(np.float32),
    }


@dataclass(frozen=True)
class Abstainer:
    """Decides, per image, whether to answer "unknown" (`decide`)."""

    scores: dict  # `held_out_scores` of the validation split
    alpha: float  # 1 - the coverage of the prediction sets
    ood_rate: float  # share of in-distribution images flagged as out of distribution

    def __post_init__(self):
        n = len(self.scores["nonconformity"])
        if n < 1 / self.alpha - 1:
            raise ValueError(
                f"{n} held-out images cannot give sets of coverage 1 - {self.alpha:g} (at "
                f"least {int(np.ceil(1 / self.alpha - 1))} are needed): raise serve.alpha or "
                "train.val_fraction"
            )
        if n * self.ood_rate < 1:
            raise ValueError(
                f"{n} held-out images cannot place an energy threshold that flags "
                f"{self.ood_rate:g} of them (at least {int(np.ceil(1 / self.ood_rate))} are "
                "needed): raise serve.ood_rate or train.val_fraction"
            )

    def threshold(self) -> float:
        """The energy above which an image is out of distribution."""
        return float(np.quantile(self.scores["energy"], 1 - self.ood_rate, method="higher"))

    def quantile(self) -> float:
        """q: the ceil((n + 1)(1 - alpha))-th smallest of the n held-out nonconformities; a
        class is in the set when its nonconformity is at most q."""
        held = np.sort(self.scores["nonconformity"].astype(np.float64))
        rank = int(np.ceil((len(held) + 1) * (1 - self.alpha)))  # <= n: __post_init__
        return float(held[rank - 1])

    def decide(self, logits: np.ndarray, probs: np.ndarray, temperature: float):
        """(sets, reasons): sets N x K booleans (the conformal prediction sets), reasons a list
        of N, None where the prediction stands, else why the answer is "unknown"."""
        sets = nonconformity(probs.astype(np.float64)) <= self.quantile()
        far = energy(logits, temperature) > self.threshold()
        return sets, [_reason(f, s) for f, s in zip(far, sets.sum(1), strict=True)]


def _reason(far: bool, size: int) -> str | None:
    if far:
        return "out_of_distribution"
    if size != 1:
        return "no_class" if size == 0 else "several_classes"
    return None
