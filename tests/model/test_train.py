"""The training engine: models learn, runs are reproducible, divergence stops cleanly."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.data.store import Split
from pipeline.errors import TrainingDiverged
from pipeline.training.batches import split_validation
from pipeline.training.engine import fit
from pipeline.training.inference import predict
from pipeline.training.scoring import metrics


def _cfg(**overrides):
    return config_from_dict({}, {"train.val_fraction": 0.1, **overrides}).train


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_each_model_learns_digits_in_a_few_epochs(digits, model):
    cfg = _cfg(**{"train.model.name": model, "train.epochs": 4, "train.schedule.warmup_epochs": 0})
    result = fit(cfg, digits.train, digits.classes, seed=0)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    acc = metrics(digits.test.labels, predict(result.model, digits.test.images), digits.classes)
    assert acc["test_accuracy"] > 0.85


def test_default_params_reach_the_accuracy_floor(digits):
    cfg = config_from_dict({})
    result = fit(cfg.train, digits.train, digits.classes, seed=cfg.base.seed)
    acc = metrics(digits.test.labels, predict(result.model, digits.test.images), digits.classes)
    assert acc["test_accuracy"] >= 0.97
    assert {"val_loss", "val_accuracy", "lr", "train_loss"} <= set(result.history[0])


def test_same_seed_same_weights_and_other_seed_differs(digits):
    cfg = _cfg(**{"train.epochs": 1, "train.model.name": "mlp"})
    a, b = (fit(cfg, digits.train, digits.classes, seed=3) for _ in range(2))
    c = fit(cfg, digits.train, digits.classes, seed=4)
    for (name, pa), pb in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model[1][1].weight, c.model[1][1].weight)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize(
    "schedule", ["constant", "exponential", "step", "multistep", "cosine", "onecycle"]
)
def test_every_optimizer_and_schedule_trains(digits, optimizer, schedule):
    cfg = _cfg(
        **{
            "train.model.name": "mlp",
            "train.epochs": 2,
            "train.optimizer.name": optimizer,
            "train.optimizer.lr": 0.001 if optimizer != "sgd" else 0.05,
            "train.schedule.name": schedule,
            "train.schedule.warmup_epochs": 0.5,
        }
    )
    result = fit(cfg, digits.train, digits.classes, seed=0)
    assert result.history[-1]["val_accuracy"] > 0.5
    assert all(np.isfinite(h["train_loss"]) for h in result.history)


def test_nan_loss_stops_with_a_clear_error(digits):
    images = digits.train.images.astype(np.float32)
    images[::2] = np.nan  # every other sample poisons its batch
    bad = replace(digits, train=Split(images, digits.train.labels)).train
    cfg = _cfg(**{"train.model.name": "mlp", "train.epochs": 3, "train.max_bad_steps": 4})
    seen = []
    with pytest.raises(TrainingDiverged, match="NaN/Inf in epoch 1.*every 4 steps.*optimizer.lr"):
        fit(cfg, bad, digits.classes, seed=0, on_epoch=seen.append)
    assert seen == []  # stopped inside the first epoch: nothing reported, so nothing registered


def test_validation_split_is_carved_from_train_only(digits):
    train, val = split_validation(digits.train, 0.1, seed=0)
    assert len(train) + len(val) == len(digits.train.labels)
    assert len(val) == int(len(digits.train.labels) * 0.1)
    train_rows = {x.tobytes() for images, _ in train.chunks(100) for x in images}
    assert not any(x.tobytes() in train_rows for images, _ in val.chunks(7) for x in images)
