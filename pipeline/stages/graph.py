"""The stage graph, declared once: each stage's function, the params it reads, the stages whose
hand-offs it takes and the file it hands on.

The CLI makes one command per stage from it and `run` is how every caller runs a stage (the CLI,
the training DAG's tasks, `pipeline reproduce`). tests/unit/test_stage_graph.py holds dvc.yaml
and the training DAG to exactly this graph. Importing this module is cheap: a stage's code is
imported when it runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.context import RunContext
from pipeline.errors import OutOfOrder, PermanentError
from pipeline.files import write_json
from pipeline.settings import Settings


@dataclass(frozen=True)
class Stage:
    """name: the CLI command, the dvc.yaml stage and the training DAG's task.
    function: "module:function", called `(cfg, settings, inputs, ctx) -> dict` where `inputs`
        maps each stage of `needs` to its hand-off.
    params: the params.yaml keys it reads (dvc.yaml `params:`).
    needs: the stages whose hand-offs it reads, in order.
    hands_on: its hand-off, a small JSON file, relative to the workspace (dvc.yaml `outs:` or
        `metrics:`): in outputs/ (git-ignored), or in reports/ for what each revision keeps.
    makes_model: `pipeline reproduce` re-runs it to retrain a registered model.
    after: stages it runs after in the DAG and dvc.yaml without needing their hand-offs: what
        they logged shows in its result when they have run (by hand it may run without them).
    """

    name: str
    function: str
    help: str
    params: tuple[str, ...]
    needs: tuple[str, ...]
    hands_on: str
    makes_model: bool = True
    after: tuple[str, ...] = ()


STAGES = (
    Stage(
        "validate",
        "pipeline.stages.validate:run",
        "check data/ against data.dvc, run the Great Expectations suite, write Data Docs",
        ("base.dataset", "base.preset", "presets", "validate"),
        (),
        "outputs/validation.json",
    ),
    Stage(
        "train",
        "pipeline.stages.train:run",
        "train on validated data; log to MLflow",
        ("base", "train", "tracking", "presets"),
        ("validate",),
        "outputs/train.json",
    ),
    Stage(
        "evaluate",
        "pipeline.stages.evaluate:run",
        "score the trained model on the test split; calibrate it on its validation split",
        ("serve.alpha", "serve.ood_rate", "register.model_name"),
        ("train",),
        "reports/metrics.json",
    ),
    Stage(
        "explain",
        "pipeline.stages.explain:run",
        "attributions: which pixels the model's answers rest on (explain.methods)",
        ("base.seed", "explain", "tracking"),
        ("train", "evaluate"),  # after evaluate, as the DAG shows it
        "outputs/explained.json",
        makes_model=False,
    ),
    Stage(
        "register",
        "pipeline.stages.register:run",
        "register the model; promote it if it passes the gate",
        ("register",),
        ("train", "evaluate"),
        "outputs/registered.json",
        makes_model=False,
        after=("explain",),  # the model card shows the explanations
    ),
    Stage(
        "compress",
        "pipeline.stages.compress:run",
        "distill, prune or quantize the model into smaller challengers (compress.methods)",
        ("base", "compress", "explain", "register", "tracking"),
        ("validate", "train", "register"),
        "outputs/compressed.json",
        makes_model=False,
    ),
)
BY_NAME = {stage.name: stage for stage in STAGES}


def _same_run(stage: Stage, inputs: dict, settings: Settings) -> None:
    """Hand-offs read from files may be older than the one before them (reports/metrics.json
    is in git): every needed hand-off that names a run must name the first one's run, or the
    stage would mix two runs. OutOfOrder names the stage to run first."""
    runs = [(need, inputs[need]["run_id"]) for need in stage.needs if "run_id" in inputs[need]]
    first, expected = runs[0] if runs else (None, None)  # train's, for the stages needing it
    for need, run_id in runs[1:]:
        if run_id != expected:
            path = settings.handoff(BY_NAME[need].hands_on)
            raise OutOfOrder(
                f"{stage.name}: the {need} hand-off ({path}) is of run {run_id}, but the "
                f"{first} hand-off is of run {expected}; run `pipeline {need}` first"
            )


def run(
    name: str, cfg: Config, settings: Settings, inputs: dict, ctx: RunContext | None = None
) -> dict:
    """Run stage `name` with the hand-offs of its `needs` in `inputs`; write its own hand-off
    (its `hands_on` file) and return it. KeyError when a needed hand-off is missing.

    A verdict against the inputs is a hand-off too: a `PermanentError` carrying one (a failed
    validation, success false) is written before it is raised, so the next stage never reads an
    older success. Other failures (a full disk, MLflow down) leave the previous hand-off as it
    was."""
    stage = BY_NAME[name]
    missing = [need for need in stage.needs if need not in inputs]
    if missing:
        raise KeyError(f"stage {name} needs the hand-off of {', '.join(missing)}")
    _same_run(stage, inputs, settings)
    module, _, function = stage.function.partition(":")
    try:
        result = getattr(importlib.import_module(module), function)(
            cfg, settings, {need: inputs[need] for need in stage.needs}, ctx or RunContext()
        )
    except PermanentError as failed:
        if failed.handoff is not None:
            write_json(settings.handoff(stage.hands_on), failed.handoff)
        raise
    if result:  # {}: a torchrun worker; rank 0 hands on
        write_json(settings.handoff(stage.hands_on), result)
    return result
