"""Training progress: a live bar in a terminal; elsewhere (Airflow task logs, files, pipes) a
line every `LOG_EVERY_S` seconds within an epoch (share done, img/s, ETA) and one per epoch."""

from __future__ import annotations

import sys
import time


class Progress:
    REFRESH_STEPS = 50  # the bar's loss/lr read the device this often, not every step
    LOG_EVERY_S = 10.0  # a line in logs this often within an epoch

    def __init__(self, epochs: int, enabled: bool = True):
        self.epochs = epochs
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.bar = None

    def start_epoch(self, epoch: int, samples: int) -> None:
        self.epoch, self.samples, self.done = epoch, samples, 0
        self.started = self.last_line = time.perf_counter()
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
        """`loss_sum` is a device tensor summed over this epoch's `step` steps; it is read (a
        device sync) only when a line or the bar's numbers are shown."""
        self.done += samples
        if self.bar is not None:
            self.bar.update(samples)
            if step % self.REFRESH_STEPS == 0:
                self.bar.set_postfix(loss=f"{float(loss_sum) / step:.4f}", lr=f"{lr:.2e}")
            return
        now = time.perf_counter()
        if now - self.last_line >= self.LOG_EVERY_S and self.done < self.samples:
            self.last_line = now
            print(self.line(now, float(loss_sum) / step, lr), file=sys.stderr, flush=True)

    def line(self, now: float, loss: float, lr: float) -> str:
        """'epoch 1/3  41% 22,528/54,000 img  2,251 img/s  ETA 14 s (run 62 s)  loss 0.3121'."""
        rate = self.done / max(now - self.started, 1e-9)
        left = self.samples - self.done
        run_left = left + (self.epochs - self.epoch) * self.samples
        return (
            f"epoch {self.epoch}/{self.epochs} {self.done / self.samples:4.0%} "
            f"{self.done:,}/{self.samples:,} img  {rate:,.0f} img/s  ETA {left / rate:.0f} s "
            f"(run {run_left / rate:.0f} s)  loss {loss:.4f} lr {lr:.2e}"
        )

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
    spent = f" epsilon {row['epsilon']:.3g}" if "epsilon" in row else ""  # DP-SGD so far
    return (
        f"epoch {row['epoch']:>3}/{epochs} lr {row['lr']:.2e} train_loss {row['train_loss']:.4f}"
        f"{val}{spent} {row['samples_per_second']:,.0f} img/s ({row['epoch_seconds']:.2f}s)"
    )
