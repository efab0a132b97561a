"""Optimizers and LR schedules: decay only on weights; each schedule has the documented shape."""

import math

import pytest
import torch

from pipeline.config import ModelConfig, OptimizerConfig, ScheduleConfig
from pipeline.training.models import small_cnn
from pipeline.training.optim import build_optimizer, param_groups
from pipeline.training.schedules import lr_factor

SPE, EPOCHS = 10, 10  # steps per epoch, epochs


def table(name: str, **kw) -> list[float]:
    """The schedule's factor at every step; no warmup unless asked for."""
    cfg = ScheduleConfig(name=name, **{"warmup_epochs": 0, **kw})
    return [lr_factor(step, SPE, EPOCHS, cfg) for step in range(SPE * EPOCHS)]


def test_constant():
    assert set(table("constant")) == {1.0}


def test_exponential_decays_once_per_epoch():
    t = table("exponential", gamma=0.5)
    assert t[0] == t[SPE - 1] == 1.0
    assert t[SPE] == 0.5 and t[3 * SPE] == 0.125


def test_step_and_multistep():
    t = table("step", gamma=0.1, step_size=3)
    assert (
        t[3 * SPE - 1] == 1.0
        and t[3 * SPE] == pytest.approx(0.1)
        and t[6 * SPE] == pytest.approx(0.01)
    )
    m = table("multistep", gamma=0.5, milestones=[2, 7])
    assert (m[2 * SPE - 1], m[2 * SPE], m[7 * SPE - 1], m[7 * SPE]) == (1.0, 0.5, 0.5, 0.25)


def test_cosine_runs_from_one_to_the_floor_through_the_midpoint():
    t = table("cosine", min_lr_ratio=0.1)
    assert t[0] == 1.0 and t[-1] == pytest.approx(0.1)
    assert t[len(t) // 2] == pytest.approx(0.55, abs=0.02)
    assert all(a >= b for a, b in zip(t, t[1:], strict=False))


def test_onecycle_rises_to_peak_then_falls_below_start():
    t = table("onecycle", pct_start=0.3, div_factor=25, final_div_factor=1e4)
    peak = t.index(max(t))
    assert t[0] == pytest.approx(1 / 25)
    assert max(t) == pytest.approx(1.0)
    assert 0.25 * len(t) <= peak <= 0.35 * len(t)
    assert t[-1] == pytest.approx(1 / 25 / 1e4)


def test_warmup_is_linear_then_hands_over_to_the_schedule():
    t = table("constant", warmup_epochs=2)
    assert t[0] == pytest.approx(1 / 20) and t[9] == pytest.approx(0.5) and t[19] == 1.0
    assert set(t[20:]) == {1.0}


def test_weight_decay_only_on_weights_not_biases_or_norms():
    model = small_cnn((1, 8, 8), 10, ModelConfig())
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    norm_and_bias = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    norm_and_bias |= {id(m.bias) for m in model.modules() if getattr(m, "bias", None) is not None}
    assert norm_and_bias <= {id(p) for p in no_decay["params"]}
    total = sum(1 for _ in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == total


def test_without_weight_decay_all_parameters_share_one_group():
    model = small_cnn((1, 8, 8), 10, ModelConfig())
    (group,) = param_groups(model, 0.0)
    assert group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_every_optimizer_builds_with_the_configured_settings(name):
    model = small_cnn((1, 8, 8), 10, ModelConfig())
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=0.02, weight_decay=0.1))
    assert opt.param_groups[0]["lr"] == 0.02
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.9
    assert not math.isnan(opt.param_groups[0]["lr"])
