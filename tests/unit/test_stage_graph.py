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
    assert f"outputs/{stage.hands_on}" in written
    for need in stage.needs:  # a changed hand-off re-runs the stage after it
        assert f"outputs/{graph.BY_NAME[need].hands_on}" in spec["deps"], need


@pytest.mark.parametrize("stage", graph.STAGES, ids=lambda s: s.name)
def test_each_stage_is_a_cli_command_and_its_function_exists(stage):
    args = build_parser().parse_args([stage.name])
    assert args.command == stage.name
    module, _, function = stage.function.partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert all(need in graph.BY_NAME for need in stage.needs)
    earlier = [s.name for s in graph.STAGES[: graph.STAGES.index(stage)]]
    assert set(stage.needs) <= set(earlier)  # the table is in an order that runs


def test_a_stage_without_its_hand_offs_is_refused(tmp_path):
    from pipeline.config import Config
    from pipeline.settings import Settings

    settings = Settings(root=tmp_path, tracking_uri="sqlite://", artifact_root="")
    with pytest.raises(KeyError, match="needs the hand-off of validate"):
        graph.run("train", Config(), settings, {})


def test_a_failed_stage_leaves_no_hand_off(tmp_path):
    """An older validation.json saying success must not outlive a failed validation."""
    from dvc.repo import Repo

    from pipeline.config import Config
    from pipeline.errors import PermanentError
    from pipeline.settings import Settings

    Repo.init(str(tmp_path), no_scm=True).close()
    settings = Settings(root=tmp_path, tracking_uri="sqlite://", artifact_root="")
    settings.outputs.mkdir()
    (settings.outputs / "validation.json").write_text('{"success": true}')
    with pytest.raises(PermanentError, match="data"):  # a DVC project without data/
        graph.run("validate", Config(), settings, {})
    assert not (settings.outputs / "validation.json").exists()
