"""Data-parallel training under torchrun: who am I, and the few collectives the engine needs.

`pipeline train --nproc N` re-launches itself through `torch.distributed.run`; each process then
sees RANK / WORLD_SIZE / LOCAL_RANK. Only rank 0 logs to MLflow and writes checkpoints.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def context() -> Dist:
    env = os.environ
    return Dist(
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    )


def init(dist: Dist, device: torch.device) -> None:
    """NCCL between GPUs, gloo between CPU processes."""
    if dist.enabled and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def mean(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        value = value.clone()
        torch_dist.all_reduce(value)
        value /= dist.world
    return value


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


def launch(nproc: int, cli_args: list[str]) -> int:
    """Run `pipeline <cli_args>` in `nproc` processes on this machine; returns the exit code."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "pipeline.cli",
        *cli_args,
    ]
    return subprocess.call(cmd)
