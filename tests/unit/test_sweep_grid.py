"""The sweep grid: every combination once, as overrides the config accepts."""

import pytest

from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.stages.sweep.common import trial_config
from pipeline.stages.sweep.grid import grid
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
    with pytest.raises(ConfigError, match="sweep.lrs") as refused:
        config_from_dict({}, {"sweep.lrs": [0.1, -1]})
    assert "optimizers" not in str(refused.value)  # the message, not the whole block
    with pytest.raises(ConfigError, match="sweep.optimizers"):
        config_from_dict({}, {"sweep.optimizers": ["adamx"]})


@pytest.mark.parametrize("strategy", ["grid", "optuna"])
@pytest.mark.parametrize("preset", ["seed-mlp-mnist", "fast-cnn-digits"])
def test_a_sweep_without_a_validation_split_is_refused_with_the_fix(strategy, preset, tmp_path):
    """Both strategies rank on validation; the two presets without one are named."""
    from pipeline.settings import Settings
    from pipeline.stages import sweep

    cfg = load_config(REPO / "params.yaml", {"base.preset": preset, "sweep.strategy": strategy})
    settings = Settings(root=tmp_path, tracking_uri="sqlite://", artifact_root="")
    fix = f"preset {preset} sets it to 0: set train.val_fraction: 0.1 under presets.{preset}"
    with pytest.raises(ConfigError, match=fix):
        sweep.start(cfg, settings)
    assert list(tmp_path.iterdir()) == []  # refused before any run or study was made


def test_trials_are_ranked_on_validation_never_on_test():
    from pipeline.stages.sweep.common import rank

    rows = [
        {"run_id": "a", "val_loss": 0.30, "val_accuracy": 0.90, "test_accuracy": 0.99},
        {"run_id": "b", "val_loss": 0.20, "val_accuracy": 0.93, "test_accuracy": 0.91},
        {"run_id": "c", "val_loss": 0.20, "val_accuracy": 0.95, "test_accuracy": 0.90},
    ]
    assert [r["run_id"] for r in rank(rows)] == ["c", "b", "a"]
