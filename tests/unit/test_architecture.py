"""The code's shape as the docs promise it: imports only go down the layers, every module a stage
runs is a dep of that stage in dvc.yaml, and the committed dvc.lock matches the code."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import choices as choice_tables
from pipeline.stages import graph
from tests.conftest import REPO

PACKAGE = REPO / "pipeline"
# Lower layers never import higher ones: base (config, settings, errors, choices, context, ...)
# < data < training < tracking < registry < stages, serving < cli and the DAGs.
LAYERS = {
    "pipeline.cli": 6,
    "pipeline.stages": 5,
    "pipeline.serving": 5,  # uses the registry like a stage; only the CLI imports it
    "pipeline.registry": 4,
    "pipeline.monitoring": 4,  # the prediction log: serving and the predict stage write it
    "pipeline.tracking": 3,
    "pipeline.training": 2,
    "pipeline.data": 1,
}
BASE = {
    f"pipeline.{name}"
    for name in (
        "config",
        "settings",
        "errors",
        "alerts",
        "choices",
        "context",
        "files",
        "interrupts",
        "children",
    )
} | {"pipeline"}
CODE = ("pipeline/", "params.yaml")  # deps whose change means code or config changed


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _path(module: str) -> Path:
    base = REPO / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _layer(module: str) -> int:
    return next((n for prefix, n in LAYERS.items() if module.startswith(prefix)), 0)


def _chosen(node: ast.AST) -> set[str]:
    """The modules a `choices.load(choices.TABLE, ...)` call may import: every entry's."""
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "choices"
        and node.args
        and isinstance(node.args[0], ast.Attribute)
    ):
        return set()
    table = getattr(choice_tables, node.args[0].attr)
    return {entry.code.partition(":")[0] for entry in table.values()}


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The pipeline modules `path` imports (inside functions too, unless `top_level_only`),
    the code a `choices.load` call there may import included."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        found |= _chosen(node)
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


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (module -> modules it imports), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return []


def test_no_import_cycles_inside_a_package():
    """Imports inside functions count too: a circle hidden that way is still a circle."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        graph[module] = {
            m for m in _imports(path) if m.rpartition(".")[0] == package and m != module
        }
    assert _cycle(graph) == []


def test_the_dags_call_only_stages_and_the_base_modules():
    wrong = []
    for path in sorted((REPO / "dags").glob("*.py")):
        for imported in _imports(path):
            if not (imported.startswith("pipeline.stages") or imported in BASE):
                wrong.append(f"{path.name} imports {imported}")
    assert wrong == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("stage", [s.name for s in graph.STAGES])
def test_each_stage_depends_on_every_module_it_runs(stage):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    assert spec["cmd"] == f"pipeline {stage}"
    # The CLI's handlers import each stage lazily: only their module-level imports run for all.
    cli = {"pipeline.cli", "pipeline.cli.commands", "pipeline.cli.parser", "pipeline.cli.display"}
    module = graph.BY_NAME[stage].function.partition(":")[0]
    runs = _closure({module, *cli}, top_level_only=cli)
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


def test_code_behind_a_choice_counts_as_imported_by_its_loader():
    """A model in a new folder is run by train: its dvc.yaml deps must cover that folder."""
    found = _imports(REPO / "pipeline" / "training" / "models.py")
    assert {e.code.partition(":")[0] for e in choice_tables.MODELS.values()} <= found
