"""Batch augmentation on the device: one gather per batch, no per-sample Python."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(
    x: torch.Tensor, generator: torch.Generator, padding: int, flip: bool, fill: float
) -> torch.Tensor:
    """Random crop after padding by `padding` pixels (filled with `fill`), then random h-flip."""
    n, c, h, w = x.shape
    if padding:
        padded = F.pad(x, (padding,) * 4, value=fill)
        shift = torch.randint(0, 2 * padding + 1, (2, n), device=x.device, generator=generator)
        rows = shift[0, :, None] + torch.arange(h, device=x.device)  # n x h
        cols = shift[1, :, None] + torch.arange(w, device=x.device)  # n x w
        x = padded[
            torch.arange(n, device=x.device)[:, None, None, None],
            torch.arange(c, device=x.device)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
    if flip:
        mirror = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x
