"""The training data as the loop sees it: a validation split carved from train, pixel statistics,
and batches that are either resident on the device or streamed from the memory map.

Datasets that fit live on the device as one tensor; a batch is an index slice of a per-epoch
permutation. Larger ones stream from a memory-mapped file through a DataLoader.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.data.store import Split

RESIDENT_MEMORY_SHARE = 0.5  # loader=auto keeps data on the device if it takes at most this share


def split_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split | None]:
    """Carve a validation split out of train; test stays untouched until evaluate."""
    if fraction == 0:
        return split, None
    order = np.random.RandomState(seed).permutation(len(split.labels))
    n_val = max(1, int(len(order) * fraction))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (
        Split(split.images[train], split.labels[train]),
        Split(split.images[val], split.labels[val]),
    )


def pixel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[float, float]:
    """Mean and std over every pixel, chunked so a memory-mapped split is never loaded whole."""
    total = total_sq = 0.0
    for start in range(0, len(images), chunk):
        part = np.asarray(images[start : start + chunk], dtype=np.float64)
        total += part.sum()
        total_sq += np.square(part).sum()
    count = images.size
    mean = float(total / count)  # plain floats: checkpoints hold no numpy objects
    std = math.sqrt(max(float(total_sq / count) - mean * mean, 0.0))
    return mean, std or 1.0


class ResidentBatches:
    """The split as one float tensor on the device; batches are slices of a permutation."""

    def __init__(self, split: Split, device, batch_size: int, dist, memory_format):
        self.x = torch.from_numpy(np.array(split.images, dtype=np.float32)).to(device)
        self.x = self.x.contiguous(memory_format=memory_format)
        self.y = torch.from_numpy(np.array(split.labels, dtype=np.int64)).to(device)
        self.batch_size, self.dist = batch_size, dist
        self.n, self.samples = len(self.y), len(self.y) // dist.world  # per process, equal

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = _shard(torch.randperm(self.n, device=self.x.device, generator=generator), self)
        for idx in order.split(self.batch_size):
            yield self.x[idx], self.y[idx]


class StreamingBatches:
    """For splits that do not fit: worker processes read batches from the memory-mapped .npy
    into pinned memory, a few batches ahead of the device."""

    def __init__(self, split: Split, device, batch_size: int, dist, memory_format):
        from torch.utils.data import DataLoader

        self.device, self.memory_format = device, memory_format
        self.batch_size, self.dist = batch_size, dist
        self.n, self.samples = len(split.labels), len(split.labels) // dist.world
        self.order: list[np.ndarray] = []
        workers = min(4, max(0, (os.cpu_count() or 1) - 1))
        self.loader = DataLoader(
            _ArrayBatches(split.images, split.labels),
            batch_size=None,
            sampler=self,  # iterated in this process: yields this epoch's index batches
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
            persistent_workers=workers > 0,
        )

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = _shard(torch.randperm(self.n, generator=generator), self)
        self.order = [idx.numpy() for idx in perm.split(self.batch_size)]
        for xb, yb in self.loader:
            xb = xb.to(self.device, non_blocking=True).float()
            yield xb.contiguous(memory_format=self.memory_format), yb.to(self.device)


class _ArrayBatches:
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __getitem__(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.sort(idx)  # sequential reads from the memory map; order within a batch is moot
        return torch.from_numpy(np.asarray(self.images[idx])), torch.from_numpy(self.labels[idx])


def _shard(order: torch.Tensor, batches) -> torch.Tensor:
    """This rank's equal share of the epoch's permutation (every rank draws the same one)."""
    dist = batches.dist
    if not dist.enabled:
        return order
    return order[: batches.samples * dist.world][dist.rank :: dist.world]


def make_batches(split: Split, cfg: TrainConfig, device, dist, memory_format):
    loader = cfg.loader
    if loader == "auto":
        need = split.images.size * 4  # float32 on the device
        if device.type == "cuda":
            available = torch.cuda.mem_get_info(device)[0]
        else:
            import psutil

            available = psutil.virtual_memory().available
        loader = "resident" if need <= RESIDENT_MEMORY_SHARE * available else "stream"
    kind = ResidentBatches if loader == "resident" else StreamingBatches
    return kind(split, device, cfg.batch_size, dist, memory_format)
