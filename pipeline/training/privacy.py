"""Differentially private training: DP-SGD (Abadi et al. 2016, arXiv:1607.00133) through Opacus.

Each step takes a Poisson sample of the N training rows (each row in with probability
q = batch_size / N, so batch sizes vary, as the accountant assumes), clips each example's
gradient to `max_grad_norm`, adds Gaussian noise of std noise_multiplier x max_grad_norm to their
sum and divides by the expected batch size. Opacus's accountant turns (noise multiplier, q, steps)
into (epsilon, delta): no one looking at the model can tell whether any one image was in the
training data with confidence better than e^epsilon (up to probability delta).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import ConfigError, PrivacyConfig

DEFAULT_DELTA = 1e-5


def delta_for(cfg: PrivacyConfig, n: int) -> float:
    """`cfg.delta`, or min(1e-5, 1 / (10 N)). ConfigError when the one given is not below 1/N: a
    delta of 1/N allows releasing one training image outright."""
    if cfg.delta is None:
        return min(DEFAULT_DELTA, 1 / (10 * n))
    if cfg.delta >= 1 / n:
        raise ConfigError(
            f"train.privacy.delta {cfg.delta:g} is not below 1/N = {1 / n:.3g} ({n} training "
            f"images); use at most {1 / (10 * n):.3g}, or null for min(1e-5, 1/(10 N))"
        )
    return cfg.delta


def check_model(model: nn.Module) -> None:
    """ConfigError naming what Opacus cannot compute per-example gradients for."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        said = "; ".join(sorted({str(e) for e in errors}))
        raise ConfigError(f"train.privacy: this model cannot be trained with DP-SGD: {said}")


@dataclass
class DPSGD:
    """The private parts of a training loop: the model that records per-example gradients,
    the optimizer that clips and noises them, and the accountant that counts each step."""

    module: nn.Module  # GradSampleModule around the model (state dict keys prefixed)
    optimizer: torch.optim.Optimizer  # DPOptimizer around the loop's optimizer
    accountant: object
    sample_rate: float
    noise_multiplier: float
    delta: float

    def epsilon(self) -> float:
        """The epsilon spent so far at `delta` (0 before the first step)."""
        return float(self.accountant.get_epsilon(self.delta)) if self.accountant.history else 0.0

    def state_dict(self) -> dict:
        return {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
        }

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: PrivacyConfig,
    n: int,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
) -> DPSGD:
    """Wrap `model` and `optimizer` for DP-SGD over `n` training rows in Poisson batches of
    expected size `batch_size` for `epochs` (steps = ceil(N / batch_size) per epoch). The noise
    multiplier is `cfg.noise_multiplier`, or solved for `cfg.target_epsilon` at the end of
    `epochs`; the noise is drawn from `generator`, so a resumed run draws what an uninterrupted
    one would. ConfigError for a model Opacus cannot take or a delta not below 1/N."""
    from opacus import GradSampleModule
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.optimizers import DPOptimizer

    check_model(model)
    delta = delta_for(cfg, n)
    rate = batch_size / n
    sigma = cfg.noise_multiplier
    if sigma is None:
        steps = epochs * math.ceil(n / batch_size)
        sigma = get_noise_multiplier(
            target_epsilon=cfg.target_epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=steps,
            accountant=cfg.accountant,
        )
    accountant = create_accountant(mechanism=cfg.accountant)
    # Opacus's hooks fire on a first layer whose input needs no gradient; torch warns each step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    private = DPOptimizer(
        optimizer,
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=batch_size,
        generator=generator,
    )
    private.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=rate))
    return DPSGD(GradSampleModule(model), private, accountant, rate, float(sigma), delta)
