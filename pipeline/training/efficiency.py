"""What a model costs to keep and to run: the deterministic figures (parameters, bytes on disk,
multiply-adds per image), which the promotion policy may gate on, and the measured speed (CPU
latency at batch 1, throughput at batch 256), which it only reports."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.training.models import ModelSpec, rebuild

THROUGHPUT_BATCH = 256


def figures(model: nn.Module, spec: ModelSpec, path: Path) -> dict[str, float]:
    """{"params", "model_bytes", "macs"} of a model and its weights file `path`. An ONNX model
    counts the parameters and MACs of the network it was exported from (`spec`): int8 keeps
    every weight and multiply-add, at a quarter of the bytes. MACs per image, counted by
    Torch-Pruning's `count_ops_and_params` (convolutions, linear layers, norms)."""
    import torch_pruning as tp

    from pipeline.training.runtime import file_bytes

    network = model if any(True for _ in model.parameters()) else rebuild(spec)
    macs, params = tp.utils.count_ops_and_params(network.eval(), torch.zeros(1, *spec.shape))
    return {"params": float(params), "model_bytes": float(file_bytes(path)), "macs": float(macs)}


@torch.no_grad()
def speed(model: nn.Module, shape: tuple[int, ...], runs: int = 200, seed: int = 0) -> dict:
    """{"latency_p50_ms", "latency_p95_ms"} of `runs` warm calls on one image, and
    "throughput" (images/s, from the median time of batches of 256), on random raw pixels of
    `shape` (C, H, W). Medians, so a burst of other work on a shared machine moves them little;
    still wall-clock: compare models measured in one process, one after the other."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    one = torch.rand(1, *shape, generator=generator) * 255
    batch = torch.rand(THROUGHPUT_BATCH, *shape, generator=generator) * 255
    for _ in range(max(10, runs // 10)):  # warm: allocator, kernels, thread pool
        model(one)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        model(one)
        times.append(time.perf_counter() - started)
    model(batch)
    batch_times, started = [], time.perf_counter()
    while len(batch_times) < 5 or time.perf_counter() - started < 1.0:  # >= 5 batches, >= 1 s
        begun = time.perf_counter()
        model(batch)
        batch_times.append(time.perf_counter() - begun)
    p50, p95 = np.percentile(times, [50, 95]) * 1000
    return {
        "latency_p50_ms": float(p50),
        "latency_p95_ms": float(p95),
        "throughput": THROUGHPUT_BATCH / float(np.median(batch_times)),
    }
