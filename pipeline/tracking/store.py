"""The MLflow store: pointing MLflow at it (the one place that sets the tracking URI), and runs
that may have been deleted."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

from pipeline.context import RunContext
from pipeline.settings import Settings
from pipeline.tracking.server import connection_failure

# The experiment's kind: model training, not GenAI. MLflow 3's UI reads it to open the runs
# rather than the traces, except where its GenAI / Model training switch decides (3.17):
# `ui_path` says it in the address.
KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {
    KIND: "custom_model_development",
    "mlflow.note.content": (
        "Image-classifier training runs of image-pipeline, one per training: the params "
        "(`train.*`, `base.*`), train_loss, val_loss and val_accuracy per epoch, then "
        "test_accuracy, test_macro_f1 and per-class precision and recall from evaluate, the "
        "model with its lineage, model card and Data Docs. The speed of each epoch is with "
        "the machine's figures under System metrics (`system/`); the learning rate per epoch "
        "is `train_lr`. The registered versions and their aliases are under Models."
    ),
}
# The runs table's columns at `ui_path` (MLflow's shared view: an experiment tag holding the
# view's state, opened by `viewStateShareKey`); the default table shows no metric or param.
VIEW = "training"
SHOWN = {
    "metrics": ("test_accuracy", "test_macro_f1", "val_accuracy"),
    "params": (
        "train.model.name",
        "train.optimizer.name",
        "train.optimizer.lr",
        "train.schedule.name",
        "train.epochs",
        "train.batch_size",
    ),  # fmt: skip
    "tags": ("data.dataset", "data.md5", "dvc.experiment"),
}
VIEW_STATE = {
    "selectedColumns": [f"{kind}.`{key}`" for kind, keys in SHOWN.items() for key in keys],
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
}
EXPERIMENT_TAGS[f"mlflow.sharedViewState.{VIEW}"] = json.dumps(VIEW_STATE)


def ui_path(experiment_id: str) -> str:
    """The MLflow UI's address of the experiment's runs, after the server's URL: MLflow 3.17
    opens every experiment as GenAI (traces) unless the address says `workflowType`."""
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW}"
    return f"/#/experiments/{experiment_id}/runs?{query}"


def configure(settings: Settings, experiment: str) -> str:
    """Point MLflow at the store and return the experiment id (created with our artifact root
    and `EXPERIMENT_TAGS`; an experiment made before them gets them once).

    Raises PermanentError when the experiment was deleted (MLflow keeps its name taken)."""
    import mlflow

    from pipeline.errors import PermanentError

    mlflow.set_tracking_uri(settings.tracking_uri)
    with _creating(settings):
        found = mlflow.get_experiment_by_name(experiment)  # a new SQLite store is made here
        if found is None:
            exp_id = mlflow.create_experiment(
                experiment,
                artifact_location=f"{settings.artifact_root.rstrip('/')}/{experiment}",
                tags=EXPERIMENT_TAGS,
            )
            mlflow.set_experiment(experiment_id=exp_id)
            return exp_id
    if found.lifecycle_stage == "deleted":
        raise PermanentError(
            f"the MLflow experiment {experiment!r} was deleted (id {found.experiment_id}, in "
            f"MLflow's trash): restore it with `MLFLOW_TRACKING_URI={settings.tracking_uri} "
            f"mlflow experiments restore --experiment-id {found.experiment_id}` or from the "
            "MLflow UI, or choose another name (--set tracking.experiment=NAME)"
        )
    exp_id = found.experiment_id
    if KIND not in found.tags:
        for key, value in EXPERIMENT_TAGS.items():
            if key not in found.tags:
                mlflow.MlflowClient().set_experiment_tag(exp_id, key, value)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextmanager
def _creating(settings: Settings):
    """One process at a time making a SQLite store's tables or an experiment: commands started
    together on a new project would otherwise run MLflow's migrations at once (one fails,
    another finds a half-made store) or create the experiment twice. A server does its own."""
    db = settings.sqlite_store
    if db is None:
        yield
        return
    from pipeline.files import exclusive

    db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new store: its user's alone
    with exclusive(db.with_name(f".{db.name}.lock")):
        _not_emptied(settings)
        yield


def _not_emptied(settings: Settings) -> None:
    """An empty file where a SQLite store is expected was a registry once (truncated by a full
    disk, a bad copy): MLflow would silently make a new, empty one over it. Refuse instead."""
    from pipeline.errors import PermanentError

    db = settings.sqlite_store
    if db is not None and db.is_file() and db.stat().st_size == 0:
        raise PermanentError(
            f"the MLflow store {db} is an empty file (0 bytes): its registry and runs are gone, "
            "and a new store would hide that. Restore it from a backup, or delete the file to "
            "start a new, empty store"
        )


def new_run(
    settings: Settings, experiment: str, ctx: RunContext, name: str, tags: dict | None = None
) -> str:
    """Open a run in `experiment` (RUNNING until ended) tagged with where it came from
    (`ctx.run_tags()`), `tags` and MLflow's own source tags; return its id. It is not made
    active: `mlflow.start_run(run_id=...)` logs into it, `MlflowClient().set_terminated` ends it."""
    from mlflow import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags

    experiment_id = configure(settings, experiment)
    resolved = resolve_tags({**ctx.run_tags(), **(tags or {}), "mlflow.runName": name})
    return MlflowClient().create_run(experiment_id, tags=resolved, run_name=name).info.run_id


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log `metrics` into run `run_id` as it is (a finished run stays finished), in batches of
    MLflow's limit of 1,000 (a 1,000-class dataset has 2,002 test scores)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for start in range(0, len(rows), 1000):
        client.log_batch(run_id, metrics=rows[start : start + 1000])


@contextmanager
def run_artifacts(run_id: str, what: str):
    """A run that never finished, or whose artifacts were deleted from MLflow, becomes a
    LookupError that says so and what to do; a server that cannot be reached stays that (see
    `reachable`)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as exc:
        if connection_failure(exc):
            raise
        status = _status(run_id)
        if status not in (None, "FINISHED"):
            raise LookupError(
                f"run {run_id} is {status}, not FINISHED: it has no {what} to read. Use "
                "a finished training run (`pipeline train`) or a registered version (`--model "
                "NAME@champion`; `pipeline status` lists them)"
            ) from None
        raise LookupError(
            f"the {what} of run {run_id} cannot be read from MLflow "
            f"({str(exc).splitlines()[0][:200]}): the run or its artifacts were deleted. "
            "Serve a version whose run exists (`pipeline status` lists them; `pipeline "
            "rollback` / `pipeline promote` move champion), or train a new one"
        ) from None


def _status(run_id: str) -> str | None:
    """The run's MLflow status (FINISHED, FAILED, KILLED, RUNNING), None when it is gone."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return None


def active_run(client, run_id: str):
    """The run; LookupError saying how to restore it when it was deleted (MLflow's trash), or
    when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if connection_failure(exc):
            raise
        raise LookupError(f"MLflow has no run {run_id}; train one with `pipeline train`") from None
    if run.info.lifecycle_stage == "deleted":
        import mlflow

        raise LookupError(
            f"run {run_id} was deleted in MLflow (it is in the trash): restore it with "
            f"`MLFLOW_TRACKING_URI={mlflow.get_tracking_uri()} mlflow runs restore --run-id "
            f"{run_id}`, or train a new one"
        )
    return run


def run_or_none(client, run_id: str | None):
    """The run, or None when it was deleted from the store (`mlflow gc`)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id) if run_id else None
    except MlflowException as exc:
        if connection_failure(exc):
            raise
        return None


def client(settings: Settings):
    """An MLflow client on the store (for commands that need no experiment)."""
    import mlflow
    from mlflow import MlflowClient

    _not_emptied(settings)
    mlflow.set_tracking_uri(settings.tracking_uri)
    return MlflowClient()
