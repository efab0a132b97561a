"""Datasets: sources, the on-disk format in data/, and their DVC versioning."""

from __future__ import annotations

from pathlib import Path

from pipeline.data import versioning
from pipeline.data.sources import load_source
from pipeline.data.store import DataError, Dataset, read_dataset, read_meta, write_dataset

__all__ = ["DataError", "Dataset", "check_data", "materialize", "read_dataset"]


def materialize(
    dataset: str,
    repo_root: Path,
    data_dir: Path,
    source_dir: Path | None = None,
    download: bool = True,
    test_fraction: float = 0.2,
    image_size: int | None = None,
    log=print,
    rewrite: bool = False,
) -> str:
    """Make data/ hold `dataset`, tracked by data.dvc and pushed to the DVC remote.

    Reuses the tracked version when it already is `dataset` (pulling it if needed) unless
    `rewrite`; otherwise writes the dataset from its source and records it (a new version when
    the bytes differ). Returns the data md5.
    """
    has_pointer = (repo_root / versioning.POINTER).exists()
    if has_pointer and not data_dir.exists():
        try:
            versioning.pull(repo_root)
        except DataError as exc:
            log(f"data: not in the DVC remote ({str(exc).splitlines()[0]}); regenerating")
    if not rewrite and has_pointer and data_dir.exists() and _meta_name(data_dir) == dataset:
        md5 = versioning.verify(repo_root, data_dir)
        log(f"data: {dataset} already at the tracked version {md5}")
        return md5
    previous = versioning.recorded_md5(repo_root) if has_pointer else None
    log(f"data: writing {dataset} to {data_dir}")
    ds = load_source(dataset, source_dir, download, test_fraction, image_size)
    write_dataset(ds, data_dir)
    md5 = versioning.add_and_push(repo_root, data_dir)
    if md5 != previous:
        log(f"data: new version {md5} (was {previous}); commit data.dvc to record it")
    else:
        log(f"data: regenerated {dataset}; identical to the tracked version {md5}")
    return md5


def _meta_name(data_dir: Path) -> str | None:
    try:
        return read_meta(data_dir).get("name")
    except DataError:
        return None


def check_data(dataset: str, repo_root: Path, data_dir: Path) -> dict:
    """Before any stage reads data/: present (pulled if needed), tracked, and the configured one."""
    if not data_dir.exists():
        versioning.pull(repo_root)
    md5 = versioning.verify(repo_root, data_dir)
    meta = read_meta(data_dir)
    if meta.get("name") != dataset:
        raise DataError(
            f"data/ holds {meta.get('name')!r} but base.dataset is {dataset!r}; run "
            f"`pipeline data pull --dataset {dataset}` or set base.dataset={meta.get('name')}"
        )
    return {"data_md5": md5, "dataset": dataset, "splits": meta.get("splits", {})}
