"""The stage graph (pipeline/stages/graph.py) is declared once: dvc.yaml, the CLI and the stage
modules follow it (the training DAG's wiring is checked in tests/dags)."""

import importlib

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.stages import graph
from tests.conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_has_exactly_the_graphs_stages_in_order():
    assert list(DVC) == [stage.name for stage in graph.STAGES]


@pytest.mark.parametrize("stage", graph.STAGES, ids=lambda s: s.name)
def test_each_dvc_stage_runs_the_cli_and_wires_its_hand_offs(stage):
    spec = DVC[stage.name]
    assert spec["cmd"] == f"pipeline {stage.name}"
    assert spec.get("params", []) == list(stage.params)
    written = [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", [])]
    written += [next(iter(m)) for m in spec.get("metrics", [])]
    assert stage.hands_on in written
    for need in (*stage.needs, *stage.after):  # a changed hand-off re-runs the stage after it
        assert graph.BY_NAME[need].hands_on in spec["deps"], need


@pytest.mark.parametrize("stage", graph.STAGES, ids=lambda s: s.name)
def test_each_stage_is_a_cli_command_and_its_function_exists(stage):
    args = build_parser().parse_args([stage.name])
    assert args.command == stage.name
    module, _, function = stage.function.partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert all(need in graph.BY_NAME for need in (*stage.needs, *stage.after))
    earlier = [s.name for s in graph.STAGES[: graph.STAGES.index(stage)]]
    assert set(stage.needs) | set(stage.after) <= set(earlier)  # an order that runs


def test_a_stage_without_its_hand_offs_is_refused(tmp_path):
    from pipeline.config import Config
    from pipeline.settings import Settings

    settings = Settings(root=tmp_path, tracking_uri="sqlite://", artifact_root="")
    with pytest.raises(KeyError, match="needs the hand-off of validate"):
        graph.run("train", Config(), settings, {})


def _fails_validation(cfg, settings, inputs, ctx):
    from types import SimpleNamespace

    from pipeline.errors import ValidationFailed

    report = SimpleNamespace(describe=lambda: "validation FAILED: 2 expectations")
    raise ValidationFailed(report, handoff={"success": False, "data_md5": "abc"})


def _disk_full(cfg, settings, inputs, ctx):
    from pipeline.errors import PermanentError

    raise PermanentError("no space left")


@pytest.mark.parametrize(
    ("function", "left"),
    [
        ("_fails_validation", {"success": False, "data_md5": "abc"}),  # the verdict replaces it
        ("_disk_full", {"success": True}),  # not a verdict: the last hand-off stays as it was
    ],
)
def test_a_failed_validation_is_handed_on_so_no_older_success_is(
    tmp_path, monkeypatch, function, left
):
    import json
    from dataclasses import replace

    from pipeline.config import Config
    from pipeline.errors import PermanentError
    from pipeline.settings import Settings

    stage = replace(graph.BY_NAME["validate"], function=f"tests.unit.test_stage_graph:{function}")
    monkeypatch.setitem(graph.BY_NAME, "validate", stage)
    settings = Settings(root=tmp_path, tracking_uri="sqlite://", artifact_root="")
    settings.outputs.mkdir()
    (settings.outputs / "validation.json").write_text('{"success": true}')
    with pytest.raises(PermanentError):
        graph.run("validate", Config(), settings, {})
    assert json.loads((settings.outputs / "validation.json").read_text()) == left
