"""Lineage: the code, data, params, validation, orchestrator and stack behind a training run.

One record per run, kept three ways: `lineage.json` in the run's artifacts, flattened into the
run's tags (searchable in the MLflow UI) and into the registered model version's tags.
"""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path

from pipeline.config import Config
from pipeline.context import RunContext

ARTIFACT = "lineage.json"
PACKAGES = {
    "torch": "torch",
    "mlflow": "mlflow",
    "airflow": "apache-airflow",
    "dvc": "dvc",
    "great_expectations": "great-expectations",
}


# Tracked files that do not make a checkout dirty: what the pipeline itself writes (dvc.lock,
# reports/), and params.yaml, whose values every run records in full (config.json, the params
# hash; `pipeline reproduce` uses them) and which `dvc exp run -S` rewrites.
NOT_CODE = ("dvc.lock", "reports", "params.yaml")


def git_state(root: Path) -> tuple[str, bool]:
    """(commit sha, dirty) of the checkout. Dirty: a tracked file other than `NOT_CODE` differs
    from the commit. Outside git: the image's build commit (PIPELINE_GIT_COMMIT, infra/Dockerfile's
    build argument) as clean, else ('unknown', True)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      *(f":(exclude){path}" for path in NOT_CODE))  # fmt: skip
        return git("rev-parse", "HEAD"), bool(changed)
    except (subprocess.CalledProcessError, FileNotFoundError):
        baked = os.environ.get("PIPELINE_GIT_COMMIT", "")
        return (baked, False) if baked else ("unknown", True)


def package_versions() -> dict[str, str]:
    found = {}
    for name, dist in PACKAGES.items():
        try:
            found[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def record(
    code_root: Path,
    cfg: Config,
    pointer: dict,
    validation: dict,
    device: str,
    ctx: RunContext | None = None,
) -> dict:
    """The lineage of a run about to train on the data version `pointer` (data.dvc's outs[0]),
    started from `ctx` (its origin and the orchestrator's ids)."""
    from pipeline.data.validation import summary

    commit, dirty = git_state(code_root)
    metrics, _ = summary(validation)
    stats = validation.get("stats", {})
    return {
        "git": {"commit": commit, "dirty": dirty},
        "data": {
            "dataset": cfg.base.dataset,
            "md5": pointer["md5"],
            "files": pointer.get("nfiles"),
            "bytes": pointer.get("size"),
            **{f"{split}_rows": s.get("rows") for split, s in stats.items()},
        },
        "data_stats": stats,
        "params": {"hash": cfg.params_hash(), "preset": cfg.base.preset},
        "validation": {
            "success": bool(validation.get("success")),
            **{k.removeprefix("validation."): int(v) for k, v in metrics.items()},
            "failed_expectations": [f"{f['split']}.{f['name']}" for f in validation["failed"]],
        },
        "origin": (ctx or RunContext()).origin,
        **(ctx or RunContext()).lineage(),
        "versions": package_versions(),
        "device": device,
    }


def of_run(run_id: str) -> dict:
    """The lineage record a training run logged (the active tracking URI)."""
    import mlflow

    from pipeline.tracking.store import run_artifacts

    with run_artifacts(run_id, "lineage record"):
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{ARTIFACT}")


def tags(lineage: dict) -> dict[str, str]:
    """Dotted tag names (`git.commit`, `data.md5`, `data_stats.train.pixel_mean`, ...)."""
    flat = {"mlflow.source.git.commit": lineage["git"]["commit"]}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif value is not None:
                text = ",".join(value) if isinstance(value, list) else value
                flat[f"{prefix}{key}"] = str(text).lower() if isinstance(value, bool) else str(text)

    walk(lineage, "")
    return flat
