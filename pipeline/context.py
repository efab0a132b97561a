"""Where a stage call comes from, as one small value the wrappers (CLI, DAG task, sweep, reproduce)
build and the stages pass on, so the stages know no orchestrator by name."""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class RunContext:
    """origin: what started the call ("cli", or the orchestrator's name, e.g. "airflow").
    ids: the orchestrator's ids of this attempt (e.g. dag_id, run_id, try_number); recorded in
        lineage and as `<origin>.<key>` run tags.
    scope: keeps calls that may run at once apart (their checkpoints), e.g. a sweep worker.
    resume: continue an interrupted training of the same identity from its checkpoint.
    tags: extra tags for the MLflow run a stage opens (a sweep trial's parent run).
    remote_handoffs: the next stage may run on a host that shares no disk with this one (a DAG's
        tasks): files it needs go through MLflow, never the workspace.
    """

    origin: str = "cli"
    ids: dict = field(default_factory=dict)
    scope: str = ""
    resume: bool = False
    tags: dict = field(default_factory=dict)
    remote_handoffs: bool = False

    def run_tags(self) -> dict[str, str]:
        """The origin's ids as tags (`airflow.dag_id`, ...), plus `tags`."""
        return {**{f"{self.origin}.{k}": str(v) for k, v in self.ids.items()}, **self.tags}

    def lineage(self) -> dict:
        """The lineage record's entry: {origin: ids} (flattened to the same tag names)."""
        return {self.origin: dict(self.ids)} if self.ids else {}

    def attempt(self) -> str:
        """Which run of the orchestrator this is, across its retries ("cli" outside one): a
        retried task resumes the checkpoint of the same attempt."""
        if not self.ids:
            return "cli"
        return "/".join(str(v) for k, v in self.ids.items() if k != "try_number")

    @property
    def first_try(self) -> bool:
        """The orchestrator's first try of this attempt: nothing of it can be resumed yet."""
        return self.ids.get("try_number") == 1

    def actor(self) -> str:
        """Who or what moved an alias: the orchestrator's run and try, or the user at the host."""
        if self.ids:
            ids = {k: v for k, v in self.ids.items() if k != "try_number"}
            tried = f" try {self.ids['try_number']}" if "try_number" in self.ids else ""
            return f"{self.origin}:{'/'.join(str(v) for v in ids.values())}{tried}"
        return f"cli:{getpass.getuser()}@{socket.gethostname()}"

    @property
    def experiment(self) -> str:
        """The DVC experiment this call runs in ("" outside one): its models register as
        challengers and never move champion."""
        return str(self.ids.get("experiment", "")) if self.origin == "dvc" else ""

    def with_(self, **changes) -> RunContext:
        """A copy with `changes`; `tags` are merged into the current ones."""
        if "tags" in changes:
            changes["tags"] = {**self.tags, **changes["tags"]}
        return replace(self, **changes)
