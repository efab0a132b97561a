"""The sweep grid: every combination once, as overrides the config accepts."""

import pytest

from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.stages.sweep import grid, trial_config
from tests.conftest import REPO


def test_grid_is_the_product_of_optimizers_schedules_and_lrs():
    cfg = load_config(REPO / "params.yaml")
    points = grid(cfg)
    s = cfg.sweep
    assert len(points) == len(s.optimizers) * len(s.schedules) * len(s.lrs)
    combos = {
        (p["train.optimizer.name"], p["train.schedule.name"], p["train.optimizer.lr"])
        for p in points
    }
    assert len(combos) == len(points)  # no duplicates
    assert {p["train.epochs"] for p in points} == {s.epochs}


def test_a_trial_is_the_base_config_with_its_grid_point():
    cfg = load_config(REPO / "params.yaml", {"base.preset": "fast-cnn-digits"})
    point = {
        "train.optimizer.name": "sgd",
        "train.schedule.name": "onecycle",
        "train.optimizer.lr": 0.05,
        "train.epochs": 2,
    }
    trial = trial_config(cfg, point)
    assert (trial.train.optimizer.name, trial.train.optimizer.lr, trial.train.epochs) == (
        "sgd",
        0.05,
        2,
    )
    assert trial.train.model.hidden == cfg.train.model.hidden  # the rest of the recipe stays
    assert trial.params_hash() != cfg.params_hash()


def test_bad_sweep_grids_are_config_errors():
    with pytest.raises(ConfigError, match="sweep.lrs"):
        config_from_dict({}, {"sweep.lrs": [0.1, -1]})
    with pytest.raises(ConfigError, match="sweep.optimizers"):
        config_from_dict({}, {"sweep.optimizers": ["adamx"]})
