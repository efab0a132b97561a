"""The learning-rate range test: its suggestion trains, a far smaller lr does not, and `auto`
must be resolved before the engine runs."""

import pytest

from pipeline.config import ConfigError, config_from_dict
from pipeline.training.engine import fit
from pipeline.training.lr_finder import range_test


def _cfg(**overrides):
    base = {"train.model.name": "mlp", "train.val_fraction": 0.1, "train.schedule.name": "constant",
            "train.schedule.warmup_epochs": 0, "train.optimizer.weight_decay": 0.0}  # fmt: skip
    return config_from_dict({}, {**base, **overrides}).train


@pytest.mark.parametrize(("optimizer", "low", "high"), [("sgd", 1e-3, 1.0), ("adamw", 1e-4, 0.1)])
def test_the_suggestion_is_a_known_good_lr_and_it_trains(digits, optimizer, low, high):
    cfg = _cfg(**{"train.optimizer.name": optimizer})
    test = range_test(cfg, digits.train, digits.classes, seed=0)
    assert test.diverged and len(test.lrs) < 100  # stopped once the loss blew up
    assert test.method == "min/10" and low <= test.suggestion <= high, test.suggestion
    lowest = min(range(len(test.smoothed)), key=test.smoothed.__getitem__)
    assert test.suggestion == pytest.approx(test.lrs[lowest] / 10)
    assert test.lrs == sorted(test.lrs) and test.smoothed[-1] > min(test.smoothed)

    def accuracy(lr: float) -> float:
        run = cfg.model_copy(update={"epochs": 3})
        run.optimizer.lr = lr
        return fit(run, digits.train, digits.classes, seed=0).history[-1]["val_accuracy"]

    suggested = accuracy(test.suggestion)
    assert suggested > 0.9
    assert accuracy(test.suggestion / 1000) < suggested - 0.2  # far below it: barely learns


def test_auto_is_a_config_value_the_engine_refuses_to_guess(digits):
    cfg = _cfg(**{"train.optimizer.lr": "auto"})
    assert cfg.optimizer.lr == "auto"
    with pytest.raises(ConfigError, match="train.optimizer.lr"):
        _cfg(**{"train.optimizer.lr": "fast"})
    with pytest.raises(ConfigError, match="range test resolves it first"):
        fit(cfg, digits.train, digits.classes, seed=0)
