"""Differentially private training: DP-SGD (Abadi et al. 2016, arXiv:1607.00133) through Opacus.

Each step takes a Poisson sample of the N training rows (each row in with probability
q = batch_size / N, so batch sizes vary, as the accountant assumes), clips each example's
gradient to `max_grad_norm`, adds Gaussian noise of std noise_multiplier x max_grad_norm to their
sum and divides by the expected batch size. Opacus's accountant turns (noise multiplier, q, steps)
into (epsilon, delta): no one looking at the model can tell whether any one image was in the
training data with confidence better than e^epsilon (up to probability delta).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import MAX_EPSILON, ConfigError, PrivacyConfig, TrainConfig

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
        if not self.accountant.history:
            return 0.0
        with warnings.catch_warnings():  # PRV warns of log(0) on its grid's edges, RDP of
            warnings.simplefilter("ignore")  # its largest order: numerics, not the figure
            return float(self.accountant.get_epsilon(self.delta))

    def state_dict(self) -> dict:
        return {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
        }

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])


def plan(cfg: TrainConfig, n: int) -> tuple[float, float]:
    """(noise multiplier, delta) for DP-SGD over `n` training rows with `cfg`: `cfg.privacy`'s
    noise multiplier, or the one that spends `target_epsilon` in `cfg.epochs` epochs of
    ceil(N / batch_size) Poisson steps. Train calls it before a run starts, so a setting with no
    guarantee is refused before any work. ConfigError, naming the key, for a batch larger than
    N, a delta not below 1/N, a target epsilon no noise reaches, or a noise multiplier that
    spends more than MAX_EPSILON (no guarantee to speak of, and PRV's accounting of it takes
    gigabytes: noise 0.01 ran a 24 GB machine out of memory)."""
    p = cfg.privacy
    if cfg.batch_size > n:
        raise ConfigError(
            f"train.batch_size {cfg.batch_size} is larger than the {n} training images: DP-SGD "
            f"samples each image with probability batch_size / N, which must be at most 1; "
            f"set train.batch_size to at most {n}"
        )
    delta = delta_for(p, n)
    steps, rate = cfg.epochs * math.ceil(n / cfg.batch_size), cfg.batch_size / n
    if p.target_epsilon is not None:
        return _solve(p.target_epsilon, delta, rate, steps, p.accountant), delta
    bound = _rdp_epsilon(p.noise_multiplier, rate, steps, delta)  # cheap; at least prv's
    if not bound <= MAX_EPSILON:
        raise ConfigError(
            f"train.privacy.noise_multiplier {p.noise_multiplier:g} spends epsilon {bound:.3g} "
            f"(RDP bound) in {steps} steps, above {MAX_EPSILON:g}: no guarantee to speak of; "
            "raise it (e.g. 1.0), or give train.privacy.target_epsilon instead"
        )
    return p.noise_multiplier, delta


def _rdp_epsilon(sigma: float, rate: float, steps: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, rate, steps)]
    with warnings.catch_warnings():  # "Optimal order is the largest alpha": a loose bound
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=8)  # train's early check and the engine ask for the same one
def _solve(target: float, delta: float, rate: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # the accountants' numerics warn on extreme sigmas
            warnings.simplefilter("ignore")
            return get_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=rate,
                steps=steps,
                accountant=accountant,
            )
    except ValueError as exc:  # "The privacy budget is too low."
        raise ConfigError(
            f"train.privacy.target_epsilon {target:g} cannot be reached in {steps} steps at "
            f"sampling rate {rate:.3g} ({exc}); raise it, or train fewer epochs or with smaller "
            "batches"
        ) from None


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    n: int,
    generator: torch.Generator,
) -> DPSGD:
    """Wrap `model` and `optimizer` for DP-SGD over `n` training rows in Poisson batches of
    expected size `cfg.batch_size`, with the noise multiplier and delta of `plan` (ConfigError
    as it says, or for a model Opacus cannot take); the noise is drawn from `generator`, so a
    resumed run draws what an uninterrupted one would."""
    from opacus import GradSampleModule
    from opacus.accountants import create_accountant
    from opacus.optimizers import DPOptimizer

    check_model(model)
    sigma, delta = plan(cfg, n)
    rate = cfg.batch_size / n
    accountant = create_accountant(mechanism=cfg.privacy.accountant)
    # Opacus's hooks fire on a first layer whose input needs no gradient; torch warns each step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    private = DPOptimizer(
        optimizer,
        noise_multiplier=sigma,
        max_grad_norm=cfg.privacy.max_grad_norm,
        expected_batch_size=cfg.batch_size,
        generator=generator,
    )
    private.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=rate))
    return DPSGD(GradSampleModule(model), private, accountant, rate, float(sigma), delta)
