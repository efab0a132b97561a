"""The Optuna study a search opens: seeded, and TPE models the results after the start-up trials."""

import pytest

from pipeline.config import ConfigError, config_from_dict
from pipeline.settings import Settings
from pipeline.stages.sweep.search import _sample, open_study

SPACE = {"train.optimizer.lr": {"low": 1e-4, "high": 0.3, "log": True}}


def _lrs(tmp_path, study: str, startup_trials: int, trials: int = 8) -> list[float]:
    cfg = config_from_dict(
        {},
        {
            "sweep.strategy": "optuna",
            "sweep.optuna.space": SPACE,
            "sweep.optuna.study": study,
            "sweep.optuna.startup_trials": startup_trials,
        },
    )
    settings = Settings(root=tmp_path, tracking_uri="", artifact_root="")
    optuna_study = open_study(cfg, settings)
    for _ in range(trials):
        trial = optuna_study.ask()
        lr = _sample(trial, cfg.sweep.optuna.space)["train.optimizer.lr"]
        optuna_study.tell(trial, abs(lr - 0.01))  # the best lr is 0.01
    return [t.params["train.optimizer.lr"] for t in optuna_study.trials]


def test_tpe_models_the_results_after_the_start_up_trials(tmp_path):
    random = _lrs(tmp_path, "random", startup_trials=100)
    guided = _lrs(tmp_path, "guided", startup_trials=3)
    assert guided[:3] == random[:3]  # the same seeded random draws first
    assert guided[3:] != random[3:]  # then TPE, not the random sampler, proposes


def test_the_default_leaves_most_of_the_default_study_to_tpe():
    optuna = config_from_dict({}, {}).sweep.optuna
    assert optuna.startup_trials <= optuna.trials // 2


@pytest.mark.parametrize("bad", [-1, "many"])
def test_a_bad_start_up_count_is_refused(bad):
    with pytest.raises(ConfigError, match="startup_trials"):
        config_from_dict({}, {"sweep.optuna.startup_trials": bad})
