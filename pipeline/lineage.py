"""Lineage: what code, data, params and orchestrator produced a run, as MLflow tags."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

from pipeline.config import Config

PACKAGES = ("torch", "mlflow", "apache-airflow", "dvc", "great-expectations")


def git_state(root: Path) -> tuple[str, bool]:
    """(commit sha, dirty) of the checkout; ('unknown', True) outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown", True


def collect(root: Path, cfg: Config, data_md5: str, airflow: dict | None = None) -> dict[str, str]:
    commit, dirty = git_state(root)
    tags = {
        "git.commit": commit,
        "git.dirty": str(dirty).lower(),
        "mlflow.source.git.commit": commit,
        "data.md5": data_md5,
        "data.dataset": cfg.base.dataset,
        "params.hash": cfg.params_hash(),
    }
    for key, value in (airflow or {}).items():
        tags[f"airflow.{key}"] = str(value)
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags
