"""What a version's live predictions are compared with: the prediction log's rows for its
validation split (the images its training held out) and its test split, made by evaluate and
stored with the run the version registers (`ARTIFACT`)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

ARTIFACT = "monitor/reference.parquet"  # in the run's artifacts


def reference(
    model,
    splits: dict[str, Iterable[np.ndarray]],
    temperature: float,
    classes: list[str],
    name: str,
):
    """A pyarrow Table of prediction-log rows (`log.COLUMNS`): `source` the split's name (e.g.
    "validation", "test"), `model` `name`, `version` 0 (not registered yet), one row per image
    of each split's chunks (uint8 N x C x H x W), scored once more by `model` at `temperature`.
    Memory: one chunk and the rows."""
    from pipeline.monitoring.log import Scored, sample, table_of
    from pipeline.training.calibration import softmax
    from pipeline.training.inference import logits_and_features

    items, every = [], np.random.default_rng()  # rate 1: every image, the generator unused
    for split, chunks in splits.items():
        for chunk in chunks:
            pixels = np.asarray(chunk, np.float32)
            logits, features = logits_and_features(model, pixels)
            probs = softmax(logits, temperature)
            answers = [classes[k] for k in probs.argmax(1)]
            items.append(
                sample(every, 1.0, split, (name, 0), Scored(pixels, features, probs, answers))
            )
    return table_of(items)
