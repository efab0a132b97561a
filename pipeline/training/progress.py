"""Training progress: a live bar in a terminal, one concise line per epoch everywhere else.

Airflow task logs are not terminals, so they get exactly one line per epoch.
"""

from __future__ import annotations

import sys


class Progress:
    REFRESH_STEPS = 50  # the bar's loss/lr read the device this often, not every step

    def __init__(self, epochs: int, enabled: bool = True):
        self.epochs = epochs
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.bar = None

    def start_epoch(self, epoch: int, samples: int) -> None:
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(
                total=samples,
                desc=f"epoch {epoch}/{self.epochs}",
                unit="img",
                unit_scale=True,
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def step(self, step: int, samples: int, loss_sum, lr: float) -> None:
        """`loss_sum` is a device tensor summed over this epoch's `step` steps."""
        self.bar.update(samples)
        if step % self.REFRESH_STEPS == 0:
            self.bar.set_postfix(loss=f"{float(loss_sum) / step:.4f}", lr=f"{lr:.2e}")

    def end_epoch(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            print(describe(row, self.epochs), file=sys.stderr, flush=True)


def describe(row: dict, epochs: int) -> str:
    val = (
        f" val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f}"
        if "val_loss" in row
        else ""
    )
    return (
        f"epoch {row['epoch']:>3}/{epochs} lr {row['lr']:.2e} train_loss {row['train_loss']:.4f}"
        f"{val} {row['samples_per_second']:,.0f} img/s ({row['epoch_seconds']:.2f}s)"
    )
