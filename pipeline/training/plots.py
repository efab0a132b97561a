"""Plots people would rather look at than read: confusion matrix, learning curves, sweeps,
reliability."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CONFUSION_CLASSES = 30  # past this many, the plot shows the most confused ones


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> Path:
    """Counts `cm` (K, K), true classes in rows, as a labelled grid; with more than 30 classes
    only the 30 most involved in mistakes (row plus column errors), so the picture stays
    readable and its cost bounded (the whole matrix is in reports/plots/predictions.csv)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = np.trace(cm) / max(1, cm.sum())
    title = f"confusion matrix (accuracy {accuracy:.4f})"
    shown = np.arange(len(classes))
    if len(classes) > CONFUSION_CLASSES:
        errors = cm - np.diag(np.diag(cm))
        involved = errors.sum(axis=0) + errors.sum(axis=1)
        shown = np.sort(np.argsort(-involved, kind="stable")[:CONFUSION_CLASSES])
        title = (
            f"the {CONFUSION_CLASSES} most confused of {len(classes)} classes\n"
            f"(accuracy over all {accuracy:.4f})"
        )
    part, names = cm[np.ix_(shown, shown)], [classes[k][:24] for k in shown]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.5 * len(names)))
    ax.imshow(part, cmap="Blues")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted", ylabel="true")
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    for (i, j), n in np.ndenumerate(part):
        color = "white" if n > part.max() / 2 else "black"
        ax.text(j, i, str(n), ha="center", va="center", color=color)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_learning_curves(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    has_val = "val_accuracy" in history[0]  # no panel for what the run did not measure
    fig, axes = plt.subplots(1, 3 if has_val else 2, figsize=(13 if has_val else 9, 3.6))
    loss_ax, lr_ax = axes[0], axes[-1]
    mark = {"marker": "o", "markersize": 4}  # a one-epoch run is one point, not an empty panel
    for split in ("train", "val"):
        if f"{split}_loss" in history[0]:
            loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], label=split, **mark)
    if has_val:  # train accuracy is not tracked: it would slow every step
        axes[1].plot(epochs, [h["val_accuracy"] for h in history], label="val", **mark)
        axes[1].set(title="val accuracy", xlabel="epoch")
    lr_ax.plot(epochs, [h["lr"] for h in history], **mark)
    loss_ax.set(title="loss" if has_val else "training loss (no validation split)", xlabel="epoch")
    lr_ax.set(title="learning rate", xlabel="epoch")
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

    has_val = all("val_accuracy" in h[0] for h in histories.values())
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(11 if has_val else 6, 4))
    loss_ax = axes[0] if has_val else axes
    for label, history in histories.items():
        epochs = [h["epoch"] for h in history]
        key = "val_loss" if has_val else "train_loss"
        loss_ax.plot(epochs, [h[key] for h in history], label=label)
        if has_val:
            axes[1].plot(epochs, [h["val_accuracy"] for h in history], label=label)
    title = "validation loss" if has_val else "training loss (no validation split)"
    loss_ax.set(title=title, xlabel="epoch", yscale="log")
    if has_val:
        axes[1].set(title="validation accuracy", xlabel="epoch")
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


def plot_attributions(
    images: np.ndarray, maps: np.ndarray, titles: list[str], heading: str, path: Path
) -> Path:
    """Each image (N, C, H, W raw pixels) beside its attribution heat map (N, H, W: |attribution|
    scaled to the image's largest, bright = moved the model most), titled with its classes;
    four images to a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_row = 4
    rows = max(1, -(-len(images) // per_row))
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(2 * per_row * 1.35, rows * 1.6))
    axes = np.atleast_2d(axes)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, heat, title) in enumerate(zip(images, maps, titles, strict=True)):
        left, right = (
            axes[i // per_row, 2 * (i % per_row)],
            axes[i // per_row, 2 * (i % per_row) + 1],
        )
        _show_image(left, image)
        left.set_title(title, fontsize=7)
        right.imshow(_scaled(heat), cmap="inferno", vmin=0, vmax=1)
        right.set_title("|attribution|", fontsize=7)
    fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_class_means(means: dict[str, np.ndarray], classes: list[str], path: Path) -> Path:
    """Per method (a row), each class's mean |attribution| map (K, H, W), each scaled to its
    largest: what the model looks at for that class, on average over the sampled images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(means), len(classes)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols + 1, 1.3 * rows + 0.4), squeeze=False)
    for r, (method, maps) in enumerate(means.items()):
        for k, ax in enumerate(axes[r]):
            ax.imshow(_scaled(maps[k]), cmap="inferno", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(classes[k][:12], fontsize=8)
        axes[r, 0].set_ylabel(method, fontsize=8)
    fig.suptitle("mean |attribution| per class, over its sampled test images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _scaled(heat: np.ndarray) -> np.ndarray:
    magnitude = np.abs(heat)
    return magnitude / max(float(magnitude.max()), 1e-12)


def _show_image(ax, image: np.ndarray) -> None:
    """Raw pixels (C, H, W) as a viewer shows them: gray for one channel, RGB for three."""
    if image.shape[0] == 3:
        ax.imshow(np.transpose(image, (1, 2, 0)).astype(np.uint8))
    else:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)


def plot_reliability(calibrated: dict, path: Path) -> Path:
    """Reliability diagram of evaluate's `calibration.json` record: accuracy against confidence
    per bin on the test split, before and after temperature scaling; a calibrated model lies on
    the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after, temperature = (calibrated[k] for k in ("before", "after", "temperature"))
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="calibrated")
    for curve, label, style in (
        (before, f"softmax (ECE {before['ece']:.4f})", "o--"),
        (after, f"T = {temperature:.3f} (ECE {after['ece']:.4f})", "s-"),
    ):
        used = [i for i, n in enumerate(curve["count"]) if n]
        confidence = [curve["confidence"][i] for i in used]
        accuracy = [curve["accuracy"][i] for i in used]
        ax.plot(confidence, accuracy, style, label=label, markersize=4)
    ax.set(
        title="reliability on the test split",
        xlabel="confidence (top probability)",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
