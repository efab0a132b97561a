"""The code's shape as the docs promise it: imports only go down the layers, every module a stage
runs is a dep of that stage in dvc.yaml, and the committed dvc.lock matches the code."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGE = REPO / "pipeline"
# Lower layers never import higher ones: cli -> stages -> data/training/tracking/registry -> base.
LAYERS = {
    "pipeline.cli": 3,
    "pipeline.stages": 2,
    "pipeline.data": 1,
    "pipeline.training": 1,
    "pipeline.tracking": 1,
    "pipeline.registry": 1,
}
CODE = ("pipeline/", "params.yaml")  # deps whose change means code or config changed


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _path(module: str) -> Path:
    base = REPO / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _layer(module: str) -> int:
    return next((n for prefix, n in LAYERS.items() if module.startswith(prefix)), 0)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The pipeline modules `path` imports (inside functions too, unless `top_level_only`)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:  # `from pipeline.x import y`: y may be a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _path(sub).exists() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return found


def _parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _closure(roots: set[str], top_level_only: set[str]) -> set[str]:
    """Every pipeline module that importing `roots` runs (packages' __init__ included)."""
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _path(module)
        todo += _imports(path, module in top_level_only) | _parents(module)
    return seen


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def test_imports_only_go_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module(path)
        for imported in _imports(path):
            if _layer(imported) > _layer(module):
                wrong.append(f"{module} imports {imported}")
    assert wrong == []


@pytest.mark.parametrize("stage", ["validate", "train", "evaluate", "register"])
def test_each_stage_depends_on_every_module_it_runs(stage):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    assert spec["cmd"] == f"pipeline {stage}"
    # The CLI's handlers import each stage lazily: only their module-level imports run for all.
    cli = {"pipeline.cli", "pipeline.cli.commands", "pipeline.cli.parser", "pipeline.cli.display"}
    runs = _closure({f"pipeline.stages.{stage}", *cli}, top_level_only=cli)
    deps = [REPO / d for d in spec["deps"]]
    uncovered = sorted(
        str(_path(m).relative_to(REPO))
        for m in runs
        if not any(_path(m) == d or d in _path(m).parents for d in deps)
        and not _docstring_only(_path(m))
    )
    assert uncovered == [], f"dvc.yaml stage {stage} runs these but does not list them as deps"


def test_the_committed_dvc_lock_matches_the_code():
    """`make repro` and commit dvc.lock after changing a stage's code or params."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "status", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    stale = {
        f"{stage}: {path} {how}"
        for stage, changes in json.loads(out.stdout or "{}").items()
        for change in changes
        if isinstance(change, dict)
        for kind in ("changed deps", "changed params")
        for path, how in _flat(change.get(kind, {}))
        if path.startswith(CODE)
    }
    assert stale == set(), "dvc.lock is stale: run `make repro` and commit dvc.lock"


def _flat(changes: dict):
    """`changed deps` map path -> status; `changed params` map file -> {key: status}."""
    for path, how in changes.items():
        if isinstance(how, dict):
            yield from ((f"{path}:{key}", status) for key, status in how.items())
        else:
            yield path, how
