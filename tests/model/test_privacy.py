"""DP-SGD in the engine: Poisson batches, epsilon per epoch from the accountant, plain weights,
batch norms converted and recorded, the accountant's state through a checkpoint, and the
settings that cannot give a guarantee refused."""

import numpy as np
import pytest
import torch

from pipeline.config import PrivacyConfig, config_from_dict
from pipeline.errors import ConfigError
from pipeline.training import checkpoint
from pipeline.training.batches import ResidentBatches, Rows
from pipeline.training.engine import fit
from pipeline.training.inference import predict
from pipeline.training.models import rebuild
from pipeline.training.privacy import delta_for, plan

PRIVATE = {
    "train.model.name": "mlp",
    "train.optimizer.name": "adamw",
    "train.optimizer.lr": 0.01,
    "train.schedule.name": "constant",
    "train.schedule.warmup_epochs": 0,
    "train.batch_size": 64,
    "train.val_fraction": 0.0,
    "train.privacy.enabled": True,
    "train.privacy.noise_multiplier": 1.0,
}


def _cfg(**more):
    return config_from_dict({}, {**PRIVATE, **more}).train


def test_a_private_run_learns_and_reports_the_accountants_epsilon_each_epoch(digits):
    from opacus.accountants import PRVAccountant

    rows = []
    result = fit(_cfg(**{"train.epochs": 8}), digits.train, digits.classes, 0, rows.append)
    epsilons = [row["epsilon"] for row in rows]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))  # it only grows
    n = len(digits.train.labels)
    expected = PRVAccountant()
    expected.history = [(1.0, 64 / n, 8 * -(-n // 64))]  # sigma, q, steps
    assert epsilons[-1] == pytest.approx(expected.get_epsilon(1e-5), rel=1e-6)
    assert result.privacy["epsilon"] == epsilons[-1] and result.privacy["delta"] == 1e-5
    assert result.privacy["sample_rate"] == pytest.approx(64 / n)
    accuracy = (predict(result.model, digits.test.images) == digits.test.labels).mean()
    assert accuracy > 0.7  # chance: 0.1; the same recipe without privacy reaches ~0.97
    state = result.model.state_dict()
    assert not any("_module" in key for key in state)  # the weights, not Opacus's wrapper's
    rebuild(result.spec).load_state_dict(state)


def test_batch_norms_become_group_norms_recorded_in_the_spec(digits):
    result = fit(_cfg(**{"train.model.name": "cnn", "train.epochs": 1}), digits.train,
                 digits.classes, 0)  # fmt: skip
    assert result.spec.norm == "group"
    norms = [type(m) for m in result.model.modules() if "Norm" in type(m).__name__]
    assert torch.nn.GroupNorm in norms and torch.nn.BatchNorm2d not in norms
    again = rebuild(type(result.spec).from_dict(result.spec.to_dict()))  # as read from a file
    again.load_state_dict(result.model.state_dict())  # strict: the same network


def test_a_target_epsilon_is_met_after_the_last_epoch(digits):
    rows = []
    cfg = _cfg(**{"train.epochs": 3, "train.privacy.noise_multiplier": None,
                  "train.privacy.target_epsilon": 2.0})  # fmt: skip
    result = fit(cfg, digits.train, digits.classes, 0, rows.append)
    assert rows[-1]["epsilon"] == pytest.approx(2.0, abs=0.02)
    assert result.privacy["noise_multiplier"] > 1.0  # solved for; more than the default's


def test_a_resumed_private_run_spends_what_an_uninterrupted_one_does(digits, tmp_path):
    path = tmp_path / "ckpt.pt"

    class Killed(Exception):
        pass

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise Killed

    cfg = _cfg(**{"train.epochs": 4})
    whole = fit(cfg, digits.train, digits.classes, 0)
    with pytest.raises(Killed):
        fit(cfg, digits.train, digits.classes, 0, stop_after_two, checkpoint_path=path)
    saved = checkpoint.load(path)
    assert saved["privacy"]["accountant"]["history"]  # the accountant's steps are in it
    resumed = fit(cfg, digits.train, digits.classes, 0, resume=saved, checkpoint_path=path)
    assert resumed.privacy == whole.privacy
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.allclose(a, b, atol=1e-5)  # the same noise, drawn from the saved RNG


def test_poisson_batches_take_each_row_independently_at_the_sampling_rate(digits):
    rows = Rows(digits.train)
    batches = ResidentBatches(rows, torch.device("cpu"), 64, _single(), torch.contiguous_format,
                              poisson=True)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    sizes = [len(y) for _ in range(20) for _, y in batches.epoch(generator)]
    n = len(rows)
    assert len(sizes) == 20 * -(-n // 64)  # ceil(N / batch) steps an epoch
    assert np.mean(sizes) == pytest.approx(64, rel=0.02) and np.std(sizes) > 4  # binomial
    uniform = ResidentBatches(rows, torch.device("cpu"), 64, _single(), torch.contiguous_format)
    assert {len(y) for _, y in list(uniform.epoch(generator))[:-1]} == {64}


def _single():
    from pipeline.training.distributed import Dist

    return Dist()


def test_delta_defaults_below_one_over_n_and_a_larger_one_is_refused():
    assert delta_for(PrivacyConfig(), 1_000) == 1e-5
    assert delta_for(PrivacyConfig(), 60_000) == pytest.approx(1 / 600_000)
    with pytest.raises(ConfigError, match=r"train.privacy.delta 0.001 is not below 1/N"):
        delta_for(PrivacyConfig(delta=1e-3), 1_000)


@pytest.mark.parametrize(
    ("sets", "said"),
    [
        ({"train.privacy.noise_multiplier": None}, "exactly one of noise_multiplier"),
        ({"train.privacy.target_epsilon": 3.0}, "exactly one of noise_multiplier"),
        ({"train.privacy.noise_multiplier": 0}, "train.privacy.noise_multiplier"),
        ({"train.privacy.max_grad_norm": -1}, "train.privacy.max_grad_norm"),
        ({"train.privacy.delta": 1.5}, "train.privacy.delta"),
        ({"train.privacy.accountant": "moments"}, "train.privacy.accountant"),
        ({"train.privacy.epsilon": 3}, "train.privacy.epsilon"),
        ({"train.grad_clip": 1.0}, "train.grad_clip is off under train.privacy"),
        ({"train.optimizer.lr": "auto"}, "lr=auto is not run under train.privacy"),
        ({"train.privacy.noise_multiplier": float("inf")}, "train.privacy.noise_multiplier"),
        ({"train.privacy.max_grad_norm": float("nan")}, "train.privacy.max_grad_norm"),
        ({"train.privacy.accountant": "gdp"}, "train.privacy.accountant"),  # underestimates
        ({"train.model.name": "resnet18"}, "resnet18 cannot train under train.privacy"),
        (
            {"train.privacy.noise_multiplier": None, "train.privacy.target_epsilon": 1e6},
            "train.privacy.target_epsilon",
        ),  # no guarantee, and the solver never ends
    ],
)
def test_settings_without_a_guarantee_are_refused_naming_the_key(sets, said):
    with pytest.raises(ConfigError) as refused:
        config_from_dict({}, {**PRIVATE, **sets})
    assert said in str(refused.value)


@pytest.mark.parametrize(
    ("sets", "n", "said"),
    [
        ({"train.batch_size": 5000}, 1000, "train.batch_size 5000 is larger than the 1000"),
        (
            {"train.privacy.noise_multiplier": None, "train.privacy.target_epsilon": 1e-4},
            1000,
            "train.privacy.target_epsilon 0.0001 cannot be reached",
        ),
        ({"train.privacy.delta": 1e-2}, 1000, "train.privacy.delta 0.01 is not below 1/N"),
        (
            {"train.privacy.noise_multiplier": 0.01},
            1000,
            "train.privacy.noise_multiplier 0.01 spends epsilon",
        ),  # PRV ran out of 24 GB on it
    ],
)
def test_a_plan_without_a_guarantee_is_refused_before_training(sets, n, said):
    with pytest.raises(ConfigError, match=said):
        plan(_cfg(**sets), n)
    assert plan(_cfg(), n) == (1.0, 1e-5)  # the same run with noise 1.0 has one


def test_privacy_settings_without_enabled_are_said_to_be_ignored(capsys):
    config_from_dict({}, {"train.privacy.target_epsilon": 1.0})
    assert "train.privacy.enabled is false" in capsys.readouterr().err


def test_lenet_trains_privately(digits):
    result = fit(_cfg(**{"train.model.name": "lenet", "train.epochs": 1}), digits.train,
                 digits.classes, 0)  # fmt: skip
    assert result.privacy["epsilon"] > 0
