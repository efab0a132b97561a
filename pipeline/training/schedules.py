"""The learning-rate schedule as a pure function of the step.

The engine sets each group's lr from `lr_factor` before every step (as nanoGPT does), so the
schedule needs no scheduler object and its whole state is the step count. Each schedule is one
function `(step, steps_per_epoch, epochs, cfg) -> multiplier` (`choices.SCHEDULES` names them).
"""

from __future__ import annotations

import math

from pipeline import choices
from pipeline.config import ScheduleConfig


def lr_factor(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> float:
    """Multiplier on the base lr at optimizer step `step` (0-based): the optional linear warmup
    times the schedule `cfg.name`."""
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * choices.load(choices.SCHEDULES, cfg.name)(step, steps_per_epoch, epochs, cfg)


# Per-epoch decays read the fractional epoch `step / steps_per_epoch`, floored.
def constant(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> float:
    return 1.0


def exponential(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> float:
    return cfg.gamma ** math.floor(step / steps_per_epoch)


def step(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> float:
    return cfg.gamma ** (math.floor(step / steps_per_epoch) // cfg.step_size)


def multistep(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> float:
    return cfg.gamma ** sum(math.floor(step / steps_per_epoch) >= m for m in cfg.milestones)


def cosine(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> float:
    """From 1 to `min_lr_ratio` over all steps, along half a cosine."""
    progress = min(1.0, step / max(1, steps_per_epoch * epochs - 1))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def onecycle(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> float:
    """Cosine rise from lr/div_factor to lr over pct_start, then cosine fall to the final lr
    (Smith & Topin 2017, as torch's OneCycleLR)."""
    total = steps_per_epoch * epochs
    start = 1 / cfg.div_factor
    end = start / cfg.final_div_factor
    peak_step = max(1, round(cfg.pct_start * total) - 1)

    def cos_interp(a: float, b: float, t: float) -> float:
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    if step <= peak_step:
        return cos_interp(start, 1.0, step / peak_step)
    return cos_interp(1.0, end, (step - peak_step) / max(1, total - 1 - peak_step))
