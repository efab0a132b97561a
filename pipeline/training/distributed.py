"""Data-parallel training under torchrun: who am I, and the few collectives the engine needs.

`pipeline train --nproc P` re-launches itself through `torch.distributed.run` on this machine;
with `--nnodes N --rdzv-endpoint HOST:PORT --rdzv-id ID` the same command on each of N machines
meets at torchrun's c10d rendezvous. Each process then sees RANK / WORLD_SIZE / LOCAL_RANK. Only
rank 0 reads checkpoints, logs to MLflow and writes checkpoints; the other ranks get its state
(`share`), and every rank the hand-off of whichever machine holds it (`first`), so no machine
needs a file of another's.
"""

from __future__ import annotations

import os
import socket
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


def share(value, dist: Dist):
    """Rank 0's `value` on every rank (any picklable object: a checkpoint's state); `value`
    itself outside torchrun."""
    if not dist.enabled:
        return value
    box = [value if dist.main else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def first(value, dist: Dist):
    """The `value` of the lowest rank that has one (not None or empty) on every rank: a
    hand-off that only the machine which made it holds, whichever rank it got."""
    if not dist.enabled:
        return value
    everyone = [None] * dist.world
    torch_dist.all_gather_object(everyone, value or None)
    return next((v for v in everyone if v), value)


def agree(fingerprint: tuple, what: str, dist: Dist) -> None:
    """Raise on every rank unless all ranks hold the same `fingerprint` of `what`."""
    if not dist.enabled:
        return
    everyone = [None] * dist.world
    torch_dist.all_gather_object(everyone, fingerprint)
    if any(f != everyone[0] for f in everyone):
        from pipeline.errors import CheckpointError

        seen = ", ".join(f"rank {r}: {f}" for r, f in enumerate(everyone))
        raise CheckpointError(f"the ranks disagree on {what} ({seen}); nothing was trained")


@dataclass(frozen=True)
class Nodes:
    """Where the processes of one training run: `nproc` on each of `nnodes` machines, which
    meet at torchrun's c10d rendezvous `endpoint` (HOST:PORT, on one of them) under `run_id`.
    `is_host`: whether this machine serves the rendezvous store (None: torchrun decides by
    whether the endpoint names this machine)."""

    nproc: int = 1
    nnodes: int = 1
    endpoint: str = ""
    run_id: str = ""
    join_timeout_s: int = 600  # how long the first machine waits for the others
    is_host: bool | None = None

    def torchrun_args(self) -> list[str]:
        if self.nnodes == 1 and not self.endpoint:
            return ["--standalone", f"--nproc-per-node={self.nproc}"]
        conf = f"join_timeout={self.join_timeout_s}"
        if self.is_host is not None:
            conf += f",is_host={str(self.is_host).lower()}"
        return [
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
            f"--rdzv-conf={conf}",
            "--max-restarts=0",  # a lost rank fails the run; the retry resumes it
        ]

    def failure(self, code: int, met: bool | None = None) -> str:
        """Why a training on these machines failed with exit code `code`: after the machines
        `met` at the rendezvous, before, or (None) either."""
        where = f"the {self.nnodes}-machine training at {self.endpoint} (rendezvous {self.run_id})"
        late = f"not all {self.nnodes} machines joined within {self.join_timeout_s} s"
        if met is False:
            return f"{where} did not start: {late}, or the endpoint was unreachable"
        lost = "a rank failed (its error is above, or on another machine) or a machine was lost"
        if met:
            return f"{where} failed with exit code {code}: {lost}"
        return (
            f"{where} failed with exit code {code}: {late}, the endpoint was unreachable, or {lost}"
        )


def launch(nodes: Nodes, module: str, args: list[str]) -> int:
    """Run `python -m <module> <args>` in `nodes.nproc` processes here under torchrun, meeting the
    other machines' when `nodes.nnodes` > 1; returns the exit code (non-zero also when too few
    machines came before the join timeout). Interrupted here (SIGTERM, Ctrl-C), it stops
    torchrun, which stops its processes."""
    from pipeline import children

    agent = children.python(
        ["-m", "torch.distributed.run", *nodes.torchrun_args(), "-m", module, *args]
    )
    try:
        return agent.wait()
    finally:
        if agent.poll() is None:
            agent.terminate()
            agent.wait()


def this_machine() -> str:
    """The address the other machines reach this one at: PIPELINE_NODE_ADDRESS (a pod's IP
    under Kubernetes), else the host name (which they must resolve)."""
    return os.environ.get("PIPELINE_NODE_ADDRESS") or socket.gethostname()


def free_port() -> int:
    """A TCP port free on this machine now (the rendezvous store binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
