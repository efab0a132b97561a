"""Plots people would rather look at than read: confusion matrix, learning curves, sweeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(classes), 1 + 0.5 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    ax.set(
        xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true"
    )
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    for (i, j), n in np.ndenumerate(cm):
        ax.text(
            j, i, str(n), ha="center", va="center", color="white" if n > cm.max() / 2 else "black"
        )
    ax.set_title(f"confusion matrix (accuracy {np.trace(cm) / cm.sum():.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_learning_curves(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(13, 3.6))
    for split in ("train", "val"):
        if f"{split}_loss" in history[0]:
            loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], label=split)
    if "val_accuracy" in history[0]:  # train accuracy is not tracked: it would slow every step
        acc_ax.plot(epochs, [h["val_accuracy"] for h in history], label="val")
    lr_ax.plot(epochs, [h["lr"] for h in history])
    for ax, title in ((loss_ax, "loss"), (acc_ax, "val accuracy"), (lr_ax, "learning rate")):
        ax.set(title=title, xlabel="epoch")
    loss_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(histories: dict[str, list[dict]], path: Path) -> Path:
    """Validation (or training) loss and validation accuracy of every trial, overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in histories.items():
        epochs = [h["epoch"] for h in history]
        key = "val_loss" if "val_loss" in history[0] else "train_loss"
        loss_ax.plot(epochs, [h[key] for h in history], label=label)
        if "val_accuracy" in history[0]:
            acc_ax.plot(epochs, [h["val_accuracy"] for h in history], label=label)
    loss_ax.set(title="validation loss", xlabel="epoch", yscale="log")
    acc_ax.set(title="validation accuracy", xlabel="epoch")
    loss_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_schedule(lrs: list[float], steps_per_epoch: int, path: Path) -> Path:
    """The learning rate at every optimizer step (warmup and schedule), epochs on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([step / max(1, steps_per_epoch) for step in range(len(lrs))], lrs)
    ax.set(title="learning-rate schedule", xlabel="epoch", ylabel="lr")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
