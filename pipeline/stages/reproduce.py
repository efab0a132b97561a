"""`pipeline reproduce MODEL/VERSION`: retrain a registered model from its lineage and compare.

The recorded data version is checked out by md5 into a DVC workspace of its own
(`outputs/reproduce/NAME-vN`, sharing the project's cache and remote), so the checkout's data/
and data.dvc stay as they are. The recorded, already resolved config is used as is.
"""

from __future__ import annotations

import os
import shutil
from contextlib import chdir
from dataclasses import replace
from pathlib import Path

import yaml

from pipeline.config import resolved_config
from pipeline.context import RunContext
from pipeline.data import versioning
from pipeline.data.versioning import POINTER
from pipeline.settings import Settings

COMPARED = ("test_accuracy", "test_macro_f1", "train_loss")


def checkout_version(repo_root: Path, workspace: Path, data: dict) -> None:
    """Make `workspace` a DVC repo whose data/ is the version `data["md5"]`, from the project's
    cache or, failing that, its default remote."""
    from dvc.repo import Repo

    shutil.rmtree(workspace, ignore_errors=True)
    workspace.mkdir(parents=True)
    project = Repo(str(repo_root))
    try:
        remotes, default = project.config["remote"], project.config["core"].get("remote")
        cache_dir = project.cache.local_cache_dir
    finally:
        project.close()
    with chdir(workspace):
        repo = Repo.init(str(workspace), no_scm=True)
        try:
            with repo.config.edit() as conf:
                conf["remote"] = {k: _relative(dict(v)) for k, v in remotes.items()}
                if default:
                    conf["core"]["remote"] = default
                conf["cache"]["dir"] = os.path.relpath(cache_dir)
        finally:
            repo.close()
    out = {"md5": data["md5"], "hash": "md5", "path": "data"}
    out |= {k: data[v] for k, v in (("size", "bytes"), ("nfiles", "files")) if data.get(v)}
    (workspace / POINTER).write_text(yaml.safe_dump({"outs": [out]}, sort_keys=False))
    versioning.pull(workspace, "it cannot be reproduced from here")


def _relative(remote: dict) -> dict:
    """A remote as the workspace's config writes it: a local folder relative to the workspace
    (the working directory). DVC's config writer takes ASCII only, and a project under
    `équipe ML/` shares that part of the path with its workspace."""
    url = str(remote.get("url", ""))
    if url and "://" not in url and os.path.isabs(url):
        remote["url"] = os.path.relpath(url)
    return remote


def reproduce(settings: Settings, ref: str, tolerance: float = 0.0) -> dict:
    """Retrain `ref` (NAME/VERSION, NAME@ALIAS or NAME) on its recorded data and config."""
    import mlflow

    from pipeline.registry import versions
    from pipeline.stages import graph
    from pipeline.tracking import lineage, store

    client = store.client(settings)
    version = versions.resolve(client, ref)
    name, run_id = version.name, version.run_id
    tags = client.get_run(run_id).data.tags
    if tags.get("compress.method"):  # its config alone would train another model
        from pipeline.registry.model_card import compress_command

        teacher = tags.get("compress.teacher_model") or "its teacher"
        raise LookupError(
            f"{name} v{version.version} was made by `pipeline compress` "
            f"({tags['compress.method']} of {teacher}), not by training alone: reproduce "
            f"{teacher}, then make it again with `{compress_command(tags)}` (with the "
            "reproduced teacher's version)"
        )
    record = lineage.of_run(run_id)
    cfg = resolved_config(mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json"))
    # The data passed validation when this model was trained; the champion the drift bound
    # compares against has moved on since, so drift is no reason to refuse a reproduction.
    cfg.validate_.drift_max_shift = None

    workspace = settings.outputs / "reproduce" / f"{name}-v{version.version}"
    print(f"reproduce: {name} v{version.version} (run {run_id}) in {workspace}")
    checkout_version(settings.root, workspace, record["data"])
    here = replace(settings, root=workspace, code_root=settings.code)
    ctx = RunContext(tags={"reproduce.of": f"{name}/{version.version}", "reproduce.of_run": run_id})
    handed: dict = {}
    for stage in graph.STAGES:  # the stages that make a model, in the graph's order
        if stage.makes_model:
            handed[stage.name] = graph.run(stage.name, cfg, here, handed, ctx)
    return compare(client, run_id, handed["train"]["run_id"], record, tolerance)


def compare(client, recorded_id: str, new_id: str, record: dict, tolerance: float) -> dict:
    """Metric by metric difference, identical weights or not, and what differs in the setup."""
    from pipeline.tracking import lineage, weights

    old, new = client.get_run(recorded_id).data, client.get_run(new_id).data
    metrics = {
        key: {
            "recorded": old.metrics.get(key),
            "reproduced": new.metrics.get(key),
            "difference": new.metrics[key] - old.metrics[key],
        }
        for key in COMPARED
        if key in old.metrics and key in new.metrics
    }
    old_weights = weights.load_weights(recorded_id)[0].state_dict()
    new_weights = weights.load_weights(new_id)[0].state_dict()
    weights_diff = max(
        float((old_weights[k].double() - new_weights[k].double()).abs().max()) for k in old_weights
    )
    now = lineage.of_run(new_id)
    setup = [
        f"{what}: recorded {a}, now {b}"
        for what, a, b in (
            ("git commit", record["git"]["commit"], now["git"]["commit"]),
            ("device", record["device"], now["device"]),
            ("torch", record["versions"].get("torch"), now["versions"].get("torch")),
        )
        if a != b
    ]
    return {
        "recorded_run": recorded_id,
        "reproduced_run": new_id,
        "metrics": metrics,
        "weights_max_abs_difference": weights_diff,
        "setup_differences": setup,
        "reproduced": all(abs(m["difference"]) <= tolerance for m in metrics.values()),
        "tolerance": tolerance,
    }


def describe(report: dict) -> str:
    lines = [f"{'metric':<16}{'recorded':>12}{'reproduced':>12}{'difference':>13}"]
    for key, m in report["metrics"].items():
        lines.append(
            f"{key:<16}{m['recorded']:>12.6f}{m['reproduced']:>12.6f}{m['difference']:>+13.2e}"
        )
    lines.append(f"weights: max |difference| {report['weights_max_abs_difference']:.3g}")
    lines += [f"setup differs: {s}" for s in report["setup_differences"]]
    verdict = "REPRODUCED" if report["reproduced"] else "NOT REPRODUCED"
    lines.append(f"{verdict} (tolerance {report['tolerance']:g}); run {report['reproduced_run']}")
    return "\n".join(lines)
