"""Training on several processes or machines for a caller that is not itself a `pipeline train`
command (a DAG task): `train_on_nodes` starts torchrun here, whose processes run this module
(`python -m pipeline.stages.nodes CALL`), each the train stage of the same call.

The call (config, settings, the validation hand-off, the RunContext) travels in a JSON file on
this machine; each machine's first process writes rank 0's result back beside it, and a
permanent error (bad data, a diverged loss) its message, so the caller fails without retrying
what would fail again.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import tempfile
from pathlib import Path

from pipeline.config import Config, ConfigError, resolved_config
from pipeline.context import RunContext
from pipeline.errors import PermanentError
from pipeline.files import write_json
from pipeline.settings import Settings


class NodesFailed(RuntimeError):
    """A training on several machines failed after they met: a rank died or a machine was
    lost. A retry of every machine resumes it."""


class NodesDidNotMeet(PermanentError):
    """Not all machines came to the rendezvous within its join timeout, or it was unreachable:
    no process trained. Retrying alone brings no more machines."""


def require_distributable(cfg: Config) -> None:
    """ConfigError for a recipe torchrun does not run, before any process starts."""
    if cfg.train.privacy.enabled:
        raise ConfigError("train.privacy runs in one process; train without --nproc/--nnodes")
    if cfg.train.optimizer.lr == "auto":
        raise ConfigError(
            "train.optimizer.lr=auto is not run under torchrun; run `pipeline lr-find` and "
            "set train.optimizer.lr to its suggestion"
        )


def rendezvous(attempt: str) -> dict:
    """A rendezvous to open on this machine for the training of `attempt` (an orchestrator's
    run and try): {"endpoint": "HOST:PORT" (this machine's address, a free port), "id"}."""
    from pipeline.training.distributed import free_port, this_machine

    return {"endpoint": f"{this_machine()}:{free_port()}", "id": re.sub(r"[^\w.-]", "_", attempt)}


def machines(nodes: dict, meeting: dict, is_host: bool, join_timeout_s: int):
    """This machine's part in the training `nodes` ({"nnodes", "nproc"}) that meets at
    `meeting` (`rendezvous`), serving its store or not: a `distributed.Nodes`."""
    from pipeline.training.distributed import Nodes

    return Nodes(
        nproc=nodes["nproc"],
        nnodes=nodes["nnodes"],
        endpoint=meeting["endpoint"],
        run_id=meeting["id"],
        join_timeout_s=join_timeout_s,
        is_host=is_host,
    )


def train_on_nodes(
    cfg: Config, settings: Settings, validation: dict, ctx: RunContext, nodes, hint: str = ""
) -> dict:
    """Train stage `cfg` on `nodes` (a `distributed.Nodes`: this machine's processes, and the
    rendezvous of all machines) and return its result, rank 0's, on every machine. Raises the
    ranks' PermanentError (as PermanentError, same message); NodesDidNotMeet when no process
    started here (`hint` appended: what the caller can do about too few machines), else
    NodesFailed, naming the rendezvous."""
    from pipeline.training.distributed import launch

    require_distributable(cfg)
    with tempfile.TemporaryDirectory(prefix="pipeline-nodes-") as folder:
        call = Path(folder) / "call.json"
        write_json(
            call,
            {
                "config": cfg.to_dict(),
                "settings": settings.to_json(),
                "validation": validation,
                "context": dataclasses.asdict(ctx),
            },
        )
        code = launch(nodes, __name__, [str(call)])
        result, error = _read(call.with_suffix(".result.json")), _read(call.with_suffix(".error"))
        met = call.with_suffix(".started").exists()
    if error:
        raise PermanentError(error)
    if code or not result:
        if met:
            raise NodesFailed(nodes.failure(code, met))
        raise NodesDidNotMeet(f"{nodes.failure(code, met)}{hint}")
    return result


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def main(call_path: str) -> None:
    """One torchrun process: the train stage of the call; this machine's first process writes
    the result (or a permanent error) beside the call file."""
    from pipeline.stages import graph

    call_file = Path(call_path)
    call_file.with_suffix(".started").touch()  # the machines met: torchrun started this rank
    call = json.loads(call_file.read_text())
    cfg = resolved_config(call["config"])
    settings = Settings.from_json(call["settings"])
    ctx = RunContext(**call["context"])
    try:
        result = graph.run("train", cfg, settings, {"validate": call["validation"]}, ctx)
    except PermanentError as exc:
        write_json(call_file.with_suffix(".error"), f"{type(exc).__name__}: {exc}")
        raise
    if result:  # {}: not this machine's first process
        write_json(call_file.with_suffix(".result.json"), result)


if __name__ == "__main__":
    main(sys.argv[1])
