"""Model zoo: the classic tutorial MLP and a small CNN, built from config and input shape."""

from __future__ import annotations

from torch import nn

from pipeline.config import ModelConfig


def build_model(cfg: ModelConfig, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    if cfg.name == "mlp":
        return mlp(shape, num_classes, cfg.hidden, cfg.dropout)
    if cfg.name == "cnn":
        return small_cnn(shape, num_classes, cfg.hidden, cfg.dropout)
    raise ValueError(f"unknown model {cfg.name!r}")


def mlp(shape, num_classes: int, hidden: int = 128, dropout: float = 0.0) -> nn.Module:
    """input -> hidden -> classes, as in the well-known PyTorch MNIST tutorial."""
    c, h, w = shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def small_cnn(shape, num_classes: int, hidden: int = 128, dropout: float = 0.0) -> nn.Module:
    """Two conv blocks (BN + ReLU, the second pooled) and a linear head; `hidden`/4 base width."""
    c = shape[0]
    width = max(8, hidden // 4)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(c, width),
        *block(width, 2 * width),
        nn.MaxPool2d(2),
        *block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * width, num_classes),
    )
