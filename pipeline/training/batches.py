"""The training data as the loop sees it: a validation part carved from train, pixel statistics,
and batches that are either resident on the device or streamed from the memory map.

Rows are read lazily: the train and validation parts are row numbers into the (memory-mapped)
split, never copies of it, so a split far larger than memory trains in bounded memory. A split
that fits the resident budget lives on the device as one tensor, and a batch is an index slice
of a per-epoch permutation; a larger one streams through a DataLoader.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.data.store import Split, release

RESIDENT_DEVICE_SHARE = 0.5  # loader=auto on CUDA: resident if it takes at most this share
CHUNK = 4096  # rows per read when filling the device or computing statistics
RELEASE_EVERY = 16  # streamed batches between dropping the memory map's pages


class Rows:
    """Some rows of a split (all of it, or the train or validation part), read on demand."""

    def __init__(self, split: Split, index: np.ndarray | None = None):
        self.images = split.images
        self.index = np.arange(len(split.labels)) if index is None else np.sort(index)
        self.labels = np.asarray(split.labels)[self.index].astype(np.int64)
        self.shape = tuple(split.images.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The images at these positions (sorted: sequential reads from the memory map)."""
        return np.asarray(self.images[self.index[np.sort(positions)]])

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(uint8 images, labels) in row order, `size` at a time, one chunk in memory."""
        for start in range(0, len(self), size):
            rows = self.index[start : start + size]
            contiguous = len(rows) and rows[-1] - rows[0] == len(rows) - 1
            images = self.images[rows[0] : rows[-1] + 1] if contiguous else self.images[rows]
            yield np.array(images), self.labels[start : start + size]
            release(self.images)


def split_validation(split: Split, fraction: float, seed: int) -> tuple[Rows, Rows | None]:
    """Carve a validation part out of train; test stays untouched until evaluate."""
    if fraction == 0:
        return Rows(split), None
    order = np.random.RandomState(seed).permutation(len(split.labels))
    n_val = max(1, int(len(order) * fraction))
    return Rows(split, order[n_val:]), Rows(split, order[:n_val])


def pixel_stats(rows: Rows) -> tuple[float, float]:
    """Mean and std over every pixel, a chunk at a time."""
    total = total_sq = 0.0
    for images, _ in rows.chunks():
        part = images.astype(np.float64)
        total += part.sum()
        total_sq += np.square(part).sum()
    count = len(rows) * int(np.prod(rows.shape))
    mean = float(total / count)  # plain floats: checkpoints hold no numpy objects
    std = math.sqrt(max(float(total_sq / count) - mean * mean, 0.0))
    return mean, std or 1.0


class ResidentBatches:
    """The rows as one float tensor on the device, filled a chunk at a time; batches are slices
    of a permutation."""

    kind = "resident"

    def __init__(self, rows: Rows, device, batch_size: int, dist, memory_format, poisson=False):
        self.x = torch.empty((len(rows), *rows.shape), dtype=torch.float32, device=device)
        start = 0
        for images, _ in rows.chunks():
            self.x[start : start + len(images)] = torch.from_numpy(images).to(device)
            start += len(images)
        self.x = self.x.contiguous(memory_format=memory_format)
        self.y = torch.from_numpy(rows.labels).to(device)
        self.batch_size, self.dist, self.poisson = batch_size, dist, poisson
        self.n, self.samples = len(self.y), len(self.y) // dist.world  # per process, equal
        self.steps, self.merged = _plan(self.n, self.samples, batch_size, poisson)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in _index_batches(self, generator, self.x.device):
            yield self.x[idx], self.y[idx]

    def in_order(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.n, self.batch_size):
            end = start + self.batch_size
            yield self.x[start:end], self.y[start:end]


class StreamingBatches:
    """For rows that do not fit: worker processes read batches from the memory-mapped .npy
    into pinned memory, a few batches ahead of the device."""

    kind = "stream"

    def __init__(self, rows: Rows, device, batch_size: int, dist, memory_format, poisson=False):
        from torch.utils.data import DataLoader

        self.rows, self.device, self.memory_format = rows, device, memory_format
        self.batch_size, self.dist, self.poisson = batch_size, dist, poisson
        self.n, self.samples = len(rows), len(rows) // dist.world
        self.steps, self.merged = _plan(self.n, self.samples, batch_size, poisson)
        self.order: list[np.ndarray] = []
        workers = min(4, max(0, (os.cpu_count() or 1) - 1))
        self.loader = DataLoader(
            _RowBatches(rows),
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
        self.order = [idx.numpy() for idx in _index_batches(self, generator, torch.device("cpu"))]
        for xb, yb in self.loader:
            yield self._to_device(xb, yb)

    def in_order(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.rows.chunks(self.batch_size):
            yield self._to_device(torch.from_numpy(images), torch.from_numpy(labels))

    def _to_device(self, xb: torch.Tensor, yb: torch.Tensor):
        xb = xb.to(self.device, non_blocking=True).float()
        return xb.contiguous(memory_format=self.memory_format), yb.to(self.device)


class _RowBatches:
    """What a DataLoader worker reads: one batch of rows per index array."""

    def __init__(self, rows: Rows):
        self.rows, self.reads = rows, 0

    def __getitem__(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.sort(idx)  # order within a batch is moot
        images, labels = self.rows.take(idx), self.rows.labels[idx]
        self.reads += 1
        if self.reads % RELEASE_EVERY == 0:
            release(self.rows.images)  # this worker's resident pages stay a few batches
        return torch.from_numpy(images), torch.from_numpy(labels)


def _index_batches(batches, generator: torch.Generator, device) -> list[torch.Tensor]:
    """This epoch's batches as row indices: slices of a permutation, or with `poisson` (DP-SGD)
    ceil(N / batch_size) Poisson samples, each row in each independently with probability
    batch_size / N, as the privacy accountant assumes (batch sizes vary around batch_size)."""
    n, size = batches.n, batches.batch_size
    if batches.poisson:
        return [
            torch.nonzero(torch.rand(n, device=device, generator=generator) < size / n)[:, 0]
            for _ in range(math.ceil(n / size))
        ]
    parts = list(_shard(torch.randperm(n, device=device, generator=generator), batches).split(size))
    return [*parts[:-2], torch.cat(parts[-2:])] if batches.merged else parts


def _plan(n: int, samples: int, batch_size: int, poisson: bool) -> tuple[int, bool]:
    """(optimizer steps per epoch, whether the last batch is merged): an epoch that would end
    in a batch of one image joins it to the batch before, since batch norm cannot train on
    one ("Expected more than 1 value per channel")."""
    if poisson:
        return math.ceil(n / batch_size), False
    merged = samples > 1 and samples % batch_size == 1
    return math.ceil(samples / batch_size) - merged, merged


def _shard(order: torch.Tensor, batches) -> torch.Tensor:
    """This rank's equal share of the epoch's permutation (every rank draws the same one)."""
    dist = batches.dist
    if not dist.enabled:
        return order
    return order[: batches.samples * dist.world][dist.rank :: dist.world]


def make_batches(
    rows: Rows, cfg: TrainConfig, device, dist, memory_format, batch_size: int, poisson=False
):
    """An iterable of (images float32 (B, C, H, W) 0..255 on `device`, labels int64 (B,))
    batches of `batch_size` rows (each rank's share under torchrun), reshuffled each epoch;
    with `poisson`, Poisson samples of expected size `batch_size` (`_index_batches`).

    Resident (the rows copied to the device once) when `train.loader` says so, or (auto) when
    the float32 rows fit: half the free device memory on CUDA, `train.resident_max_mb` of host
    memory on the CPU; otherwise streamed from `rows` (a memory map) a chunk at a time."""
    loader = cfg.loader
    if loader == "auto":
        need = len(rows) * int(np.prod(rows.shape)) * 4
        if device.type == "cuda":
            budget = RESIDENT_DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]
        else:
            budget = cfg.resident_max_mb * 2**20
        loader = "resident" if need <= budget else "stream"
    kind = ResidentBatches if loader == "resident" else StreamingBatches
    return kind(rows, device, batch_size, dist, memory_format, poisson)
