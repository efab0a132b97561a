"""Datasets: sources, the on-disk format in data/, and their DVC versioning."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data import versioning
from pipeline.data.sources import recipe, write_source
from pipeline.data.store import DataError, Dataset, read_dataset, read_meta

__all__ = ["DataError", "Dataset", "check_data", "check_validated", "materialize", "read_dataset"]


def materialize(
    dataset: str,
    repo_root: Path,
    data_dir: Path,
    data: DataConfig | None = None,
    log=print,
    rewrite: bool = False,
) -> str:
    """Make data/ hold `dataset` made with these settings, tracked by data.dvc and pushed to
    the DVC remote. Returns the data md5.

    Reuses the tracked version when it was made with the same settings from the same source
    content (its meta.json `recipe`), pulling it if needed, unless `rewrite`; otherwise writes
    the dataset from its source and records it (a new version when the bytes differ). A pull
    killed between writing data/ and recording it is finished by the next one.
    """
    data = data or DataConfig()
    if data.download_dir is None:  # this project's cache, wherever the command runs
        data = data.model_copy(update={"download_dir": str(repo_root / ".cache" / "datasets")})
    wanted = recipe(dataset, data)
    # DVC's lock first: another DVC command holding it fails the pull before data/ is touched,
    # and no other can take it between swapping data/ and recording it in data.dvc.
    with versioning.data_lock(repo_root), versioning.locked_repo(repo_root) as repo:
        interrupted = versioning.pending_write(repo_root)
        has_pointer = (repo_root / versioning.POINTER).exists()
        if has_pointer and not data_dir.exists() and not interrupted:
            try:
                versioning.pull(repo_root, repo=repo)
            except DataError:
                log(
                    f"data: the tracked version {versioning.recorded_md5(repo_root)} is not in "
                    f"the local cache or the DVC remote; writing {dataset} from its source"
                )
        if interrupted:
            log("data: finishing a `pipeline data pull` that was interrupted; writing it again")
        elif not rewrite and has_pointer and data_dir.exists():
            changed = _changed_settings(data_dir, wanted)
            if not changed:
                md5 = versioning.verify(repo_root, data_dir)
                log(f"data: {dataset} already at the tracked version {md5}")
                return md5
            log(
                f"data: the source or settings differ from the tracked version ({changed}); "
                "rewriting"
            )
        previous = versioning.recorded_md5(repo_root) if has_pointer else None
        log(f"data: writing {dataset} to {data_dir}")
        before = _meta_bytes(data_dir)
        versioning.mark_pending(repo_root, wanted)
        try:
            write_source(dataset, data, data_dir, wanted)
        except BaseException:
            # data/ is swapped in whole (DatasetWriter): the same meta.json means it was not
            # touched, so a refused or failed read leaves nothing to finish.
            if not interrupted and _meta_bytes(data_dir) == before:
                versioning.clear_pending(repo_root)
            raise
        md5 = versioning.add(repo_root, data_dir, repo)
        versioning.clear_pending(repo_root)
        versioning.push(repo_root, repo)
    if md5 != previous:
        log(f"data: new version {md5} (was {previous}); commit data.dvc to record it")
    else:
        log(f"data: regenerated {dataset}; identical to the tracked version {md5}")
    return md5


def _meta_bytes(data_dir: Path) -> bytes | None:
    path = data_dir / "meta.json"
    return path.read_bytes() if path.exists() else None


def _changed_settings(data_dir: Path, wanted: dict) -> str:
    """'' when data/ was made with `wanted`, else what differs ('test_fraction 0.2 -> 0.5',
    'source: +40 files, new folder 'c' (20 files)'); data written before recipes were recorded
    counts as different."""
    from pipeline.data.fingerprint import describe_change

    try:
        made = read_meta(data_dir).get("recipe")
    except DataError:
        return "data/meta.json unreadable"
    if not made:
        return "data/ records no settings"
    changed = []
    for key in sorted(set(made) | set(wanted)):
        if made.get(key) == wanted.get(key):
            continue
        if key == "source_files":
            changed.append(f"source: {describe_change(made.get(key), wanted.get(key))}")
        else:
            changed.append(f"{key} {made.get(key)} -> {wanted.get(key)}")
    return ", ".join(changed)


def check_data(dataset: str, repo_root: Path, data_dir: Path, wait: bool = True) -> dict:
    """Before any stage reads data/: present (pulled if needed), tracked, and the configured one.

    `wait=False`: the slow part, comparing data/ with data.dvc, runs in a child process (on the
    other core while the caller imports torch) and the result holds `"wait"`, a function that
    finishes the check (raising what it would have); call it before reading data/."""
    if not data_dir.exists():
        versioning.pull(repo_root)
    if wait:
        return _check_meta(dataset, data_dir, versioning.verify(repo_root, data_dir))
    wait_for = versioning.verify_started(repo_root, data_dir)
    data = _check_meta(dataset, data_dir, versioning.recorded_md5(repo_root))
    return {**data, "wait": wait_for}


def _check_meta(dataset: str, data_dir: Path, md5: str) -> dict:
    meta = read_meta(data_dir)
    if meta.get("name") != dataset:
        raise DataError(
            f"data/ holds {meta.get('name')!r} but base.dataset is {dataset!r}; run "
            f"`pipeline data pull --dataset {dataset}` or set base.dataset={meta.get('name')}"
        )
    return {"data_md5": md5, "dataset": dataset, "splits": meta.get("splits", {})}


def check_validated(
    dataset: str, repo_root: Path, data_dir: Path, validation: dict, wait: bool = True
) -> dict:
    """`check_data`, and that this data version passed validation (`validation`: the validate
    stage's result); training on anything else is refused.

    `wait=False`: as for `check_data`."""
    data = check_data(dataset, repo_root, data_dir, wait)
    if not validation.get("success") or validation.get("data_md5") != data["data_md5"]:
        raise DataError(
            f"data version {data['data_md5']} has not passed validation (last validated: "
            f"{validation.get('data_md5')}, success={validation.get('success')}); "
            "run `pipeline validate` first"
        )
    return data
