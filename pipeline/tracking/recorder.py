"""The MLflow run of one training, opened, fed its epochs and closed by a recorder.

Where MLflow is not imported yet (`pipeline train`, a DAG task), the recorder is a child process
fed over a pipe: MLflow's import (~1.5 s), opening the store (~1 s) and its teardown then run on
the other core while this process imports torch and trains, instead of before and after. Where
MLflow is loaded already (a sweep worker, between trials), it records in-process. Both take the
same calls: `open`, `check`, `run_id`, `epoch`, then `end` (or `abort` on a failure), `close`.

A parent that vanishes without `end` (SIGKILL, OOM) closes or resets the child's pipe: the child
ends the run KILLED and says why. A run left RUNNING when both went is ended when the same training
identity next opens one (`orphans.end_abandoned`), on this host or, for a later try of the same
orchestrator run, on any.

Each epoch's checkpoint is also uploaded to the run (`epoch`, off the training thread, before
that epoch's metrics), so a retry on a host that shares no disk with this one resumes it
(`settle_checkpoint`) with no epoch logged twice; the upload is deleted once the run is FINISHED
with its model, or a new run of the same training replaces it.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config
from pipeline.context import RunContext
from pipeline.settings import Settings
from pipeline.tracking import orphans

SYSTEM_METRICS_INTERVAL_S = 2.0


@dataclass
class Opening:
    """What a run is opened with. `cfg` trains (params and config.json: numbers only); `given`
    is the config as asked for (its params hash is what skip-unchanged compares; it differs with
    `lr: auto`). `resume` is {"mlflow_run_id", "epoch", "history"} of a checkpoint, or None.
    `owner` is the training process (`interrupts.owner()`) and `argv` its command line (MLflow's
    source tags), not the recorder's."""

    cfg: Config
    given: Config
    settings: Settings
    validation: dict
    ctx: RunContext
    dataset: str
    identity: str
    device: str
    processes: int
    owner: dict
    resume: dict | None = None
    argv: list[str] = field(default_factory=lambda: list(sys.argv))


def begin() -> Recorder | Child:
    """A recorder for the training about to start: a child process (started now, importing
    MLflow while the caller goes on) unless MLflow is already imported here. A torchrun rank
    other than 0 records nothing: it gets one that is never opened."""
    if "mlflow" in sys.modules or os.environ.get("RANK", "0") != "0":
        return Recorder()
    return Child()


# The run page's "Model metrics" tab sorts by name and puts each "prefix/" section above its
# own; "system/" goes to the "System metrics" tab beside MLflow's CPU and memory figures. So
# the speed goes there and the lr sorts after the scores: the tab opens on test_accuracy.
# history.json keeps the engine's names.
METRIC_NAMES = {
    "epoch_seconds": "system/epoch_seconds",
    "samples_per_second": "system/samples_per_second",
    "lr": "train_lr",
}


def log_epoch(client, run_id: str, row: dict) -> None:
    """One epoch's metrics (`METRIC_NAMES` renames timing and lr) in one batched call; never
    per step.

    Synchronous on purpose: MLflow's async queue cost ~40 % on a 3-epoch CPU run here, one
    batched write per epoch costs nothing measurable (`bench/engine.py`, tracking_overhead)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(METRIC_NAMES.get(k, k), v, now, row["epoch"]) for k, v in row.items() if k != "epoch"
    ]
    client.log_batch(run_id, metrics=metrics)


class _Recording:
    def abort(self, status: str, tags: dict | None = None) -> None:
        """`end` after a failure, which is what the caller goes on to raise: an error ending the
        run is printed, not raised in its place."""
        try:
            self.end(status, tags)
        except Exception as exc:
            print(f"note: the MLflow run could not be ended {status}: {exc}", file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Recorder(_Recording):
    """Records in this process, with the system-metrics sampler (CPU, memory, GPU with
    nvidia-ml-py, every few seconds) from the run's creation to its end."""

    run_id: str
    uploads = None  # the thread of epochs with checkpoints, once there is one
    uploaded: int | None = None  # the mtime of the checkpoint uploaded last
    failed: BaseException | None = None  # what that thread met logging an epoch

    def open(self, opening: Opening) -> None:
        from mlflow import MlflowClient
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        from pipeline.tracking import store

        experiment = store.configure(opening.settings, opening.cfg.tracking.experiment)
        self.client = MlflowClient()
        self.run_id = _open_run(self.client, experiment, opening)
        self.monitor = SystemMetricsMonitor(
            self.run_id, SYSTEM_METRICS_INTERVAL_S, 1, resume_logging=opening.resume is not None
        )
        self.monitor.start()

    def check(self) -> None:
        """Raise what logging an earlier epoch met (`Child.check`: what its process met)."""
        if self.failed is not None:
            raise self.failed

    def epoch(self, row: dict, checkpoint: Path | None = None) -> None:
        """Log one epoch's metrics. With the `checkpoint` just written for it, upload that
        first, both in the background (a thread here; the child's own loop in `Child`): an
        epoch never waits for them, and an epoch in the run means its checkpoint is there too,
        so a retry that resumes from it on another host never logs an epoch twice."""
        from concurrent.futures import ThreadPoolExecutor

        self.check()
        if checkpoint is None:
            return log_epoch(self.client, self.run_id, row)
        if self.uploads is None:
            self.uploads = ThreadPoolExecutor(1, "checkpoint-upload")
        self.uploads.submit(self._record, row, checkpoint)

    def _record(self, row: dict, checkpoint: Path) -> None:
        self._upload(checkpoint)
        try:
            log_epoch(self.client, self.run_id, row)
        except BaseException as exc:  # raised in the trainer by the next epoch or the end
            self.failed = exc

    def _upload(self, path: Path) -> None:
        """The file as it is now (a later epoch's when it was replaced meanwhile: renames are
        atomic); skipped when unchanged since the last upload. A failure is said and left to
        the next epoch: the local copy still resumes on this host."""
        try:
            stamp = path.stat().st_mtime_ns
            if stamp != self.uploaded:
                self.client.log_artifact(self.run_id, str(path), CHECKPOINT_FOLDER)
                self.uploaded = stamp
        except Exception as exc:
            print(f"note: checkpoint not uploaded to MLflow this epoch ({exc})", file=sys.stderr)

    def end(
        self,
        status: str,
        tags: dict | None = None,
        artifacts: Path | None = None,
        params: dict | None = None,
        keep_checkpoint: bool | None = None,
    ) -> None:
        """Log the files under `artifacts` (paths kept), set `tags` and `params` (what is known
        only at the end, such as DP-SGD's epsilon), stop the sampler (its last samples logged)
        and close the run as `status`. The uploaded checkpoint is deleted unless
        `keep_checkpoint` (default: unless the run did not finish, so a retry can resume)."""
        from mlflow.entities import Param, RunTag

        if self.uploads is not None:
            self.uploads.shutdown(wait=True)
            self.check()
        if artifacts is not None:
            self.client.log_artifacts(self.run_id, str(artifacts))
        keep = status != "FINISHED" if keep_checkpoint is None else keep_checkpoint
        if not keep:  # the logged model is the durable copy
            _delete_checkpoint(self.client, self.run_id)
        if tags or params:
            self.client.log_batch(
                self.run_id,
                params=[Param(k, str(v)) for k, v in (params or {}).items()],
                tags=[RunTag(k, v) for k, v in (tags or {}).items()],
            )
        self.monitor.finish()
        self.client.set_terminated(self.run_id, status)

    def close(self) -> None:
        """Nothing to release in-process (`Child.close` ends its process)."""


class Child(_Recording):
    """A `Recorder` in a child process, fed over a pipe. What it meets is raised here: a failed
    opening (a deleted experiment, an unreachable server) by `check`, which does not wait, or at
    the latest by `run_id` (the first checkpoint); a failed epoch by the next `epoch`; a failed
    end by `end`."""

    def __init__(self):
        from multiprocessing import Pipe

        from pipeline import children

        self.conn, theirs = Pipe()
        self.proc = children.python(
            ["-m", "pipeline.tracking.recorder", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self._run_id: str | None = None
        self._unopened = False  # its opening failed: no run, and the process is gone

    def open(self, opening: Opening) -> None:
        self.conn.send(("open", opening))

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            self._reply("opened")
        return self._run_id

    def check(self) -> None:
        while self.conn.poll():
            self._take(self._recv())

    def epoch(self, row: dict, checkpoint: Path | None = None) -> None:
        self.check()
        self._send(("epoch", row, checkpoint))

    def end(
        self,
        status: str,
        tags: dict | None = None,
        artifacts: Path | None = None,
        params: dict | None = None,
        keep_checkpoint: bool | None = None,
    ) -> None:
        if not self._unopened:
            self._send(("end", status, tags, artifacts, params, keep_checkpoint))
            self._reply("ended")
        self.close()

    def close(self) -> None:
        """Close the pipe and wait for the child: a run still open is ended KILLED by it."""
        if not self.conn.closed:
            self.conn.close()
            self.proc.wait()

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except OSError:  # it is gone: what it said last, if anything
            self.check()
            raise self._gone() from None

    def _recv(self) -> tuple:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise self._gone() from None

    def _reply(self, expected: str):
        while True:
            kind, value = self._take(self._recv())
            if kind == expected:
                return value

    def _take(self, message: tuple) -> tuple:
        kind, value = message
        if kind == "opened":
            self._run_id = value
        elif kind == "error":
            self._unopened = self._run_id is None
            raise value
        return message

    def _gone(self) -> RuntimeError:
        self._unopened = self._run_id is None
        return RuntimeError(
            f"the MLflow recorder process exited (code {self.proc.wait()}) without a word; "
            "its error, if any, is above"
        )


def _serve(conn) -> None:
    """The child's loop: open, then epochs until `end`. Errors are told to the trainer; after
    the opening it goes on serving, so the trainer can still end the run. A trainer gone
    without `end` (the pipe closed or reset) leaves the run to be ended KILLED here."""
    recorder = Recorder()
    try:
        _, opening = conn.recv()
    except (EOFError, OSError):  # the trainer stopped before opening a run
        return
    sys.argv[:] = opening.argv  # MLflow's source tags name the trainer's command
    try:
        recorder.open(opening)
    except BaseException as exc:
        _tell(conn, "error", exc)
        return
    if not _tell(conn, "opened", recorder.run_id):
        return _trainer_gone(recorder, opening)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return _trainer_gone(recorder, opening)
        try:
            if message[0] == "epoch":  # this process is the background here
                _, row, checkpoint = message
                if checkpoint is not None:
                    recorder._upload(checkpoint)  # first: see Recorder.epoch
                recorder.epoch(row)
                continue
            recorder.end(*message[1:])
            reply = ("ended", None)
        except BaseException as exc:
            reply = ("error", exc)
        if not _tell(conn, *reply):
            return _trainer_gone(recorder, opening)
        if reply[0] == "ended":
            return


def _tell(conn, kind: str, value) -> bool:
    """Send (kind, value); False when the trainer is gone."""
    try:
        try:
            conn.send((kind, value))
        except (TypeError, AttributeError, pickle.PicklingError):  # an error that does not pickle
            conn.send((kind, RuntimeError(f"{type(value).__name__}: {value}")))
    except OSError:
        return False
    return True


def _trainer_gone(recorder: Recorder, opening: Opening) -> None:
    why = orphans.left_by(opening.owner["pid"], opening.owner["host"])
    recorder.abort("KILLED", {"train.interrupted": why})
    print(f"note: MLflow run {recorder.run_id} ended KILLED: {why}", file=sys.stderr)


def _open_run(client, experiment: str, o: Opening) -> str:
    """The run id: a new run with its params, config, lineage tags (the validation counts among
    them) and Data Docs, or the checkpoint's run reopened with the epochs a killed process
    checkpointed but never logged."""
    from mlflow.entities import Param

    from pipeline.data.versioning import pointer
    from pipeline.tracking import lineage, store

    settings, cfg = o.settings, o.cfg
    record = lineage.record(settings.code, o.given, pointer(settings.root), o.validation,
                            o.device, o.ctx)  # fmt: skip
    tags = {
        **lineage.tags(record),
        "train.processes": str(o.processes),
        "train.identity": o.identity,
        **{f"train.{key}": value for key, value in o.owner.items()},
        **o.ctx.tags,  # e.g. mlflow.parentRunId for a sweep trial, reproduce.of
    }
    run_id = o.resume["mlflow_run_id"] if o.resume else None
    orphans.end_abandoned(client, experiment, o.identity, o.ctx, keep=run_id)
    if run_id is not None and _run_exists(client, run_id):
        client.update_run(run_id, "RUNNING")  # ended KILLED when its trainer was killed
        if "train.interrupted" in client.get_run(run_id).data.tags:  # it runs again now; the
            client.delete_tag(run_id, "train.interrupted")  # resume is `train.resumed_from_epoch`
        for key, value in {**tags, "train.resumed_from_epoch": str(o.resume["epoch"])}.items():
            client.set_tag(run_id, key, value)
        print(f"resuming MLflow run {run_id} after epoch {o.resume['epoch']}", file=sys.stderr)
    else:
        t = cfg.train
        name = o.ctx.tags.get("mlflow.runName") or (
            f"{o.dataset}-{t.model.name}-{t.optimizer.name}-{t.schedule.name}-lr{t.optimizer.lr:g}"
        )
        run_id = store.new_run(settings, cfg.tracking.experiment, o.ctx, name, tags)
        _supersede(client, experiment, o.identity, keep=run_id)
        params = [Param(k, str(v)) for k, v in cfg.flat().items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 params a batch
            client.log_batch(run_id, params=params[start : start + 100])
        client.log_dict(run_id, cfg.to_dict(), "config.json")
        _log_data_docs(client, run_id, settings, o.validation)
    client.log_dict(run_id, record, lineage.ARTIFACT)  # again on resume: the try moved on
    if o.resume:  # epochs a killed process checkpointed but never got to log
        logged = {m.step for m in client.get_metric_history(run_id, "train_loss")}
        for row in o.resume["history"]:
            if row["epoch"] not in logged:
                log_epoch(client, run_id, row)
    return run_id


def _log_data_docs(client, run_id: str, settings: Settings, validation: dict) -> None:
    """The validation's Data Docs into the run (`data_docs/`): from its MLflow run when it was
    recorded on another host ("docs_run"), else from this workspace; a FINISHED run without
    them says why."""
    import tempfile

    if validation.get("docs_run"):
        with tempfile.TemporaryDirectory() as folder:
            got = client.download_artifacts(validation["docs_run"], "data_docs", folder)
            client.log_artifacts(run_id, got, "data_docs")
        return
    docs = settings.root / validation.get("docs", "")  # relative to the workspace
    if docs.is_file():
        client.log_artifacts(run_id, str(docs.parent), "data_docs")
    else:
        print(f"note: no Data Docs at {docs}; the run has none", file=sys.stderr)


CHECKPOINT_FOLDER = "checkpoint"  # the run's artifact folder of its last epoch checkpoint


def settle_checkpoint(settings: Settings, experiment: str, identity: str, path: Path):
    """The state to resume training `identity` from (`checkpoint.load`), or None. A local
    checkpoint whose run has FINISHED since (on another machine) is a leftover, removed; with
    none left, the checkpoint the newest unfinished run of the identity uploaded (from any host)
    is downloaded to `path`. Says which, or that there is nothing to resume."""
    import shutil
    import tempfile

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.files import write_atomic
    from pipeline.tracking import store
    from pipeline.training import checkpoint

    experiment_id = store.configure(settings, experiment)
    client = MlflowClient()
    if path.exists():
        state = checkpoint.load(path)
        run_id = state.get("mlflow_run_id")
        if not run_id or _reopenable(client, run_id):
            return state
        path.unlink()
        print(
            f"note: {path} was left by run {run_id}, which has finished; removed", file=sys.stderr
        )
    query = f"tags.`train.identity` = '{identity}' and attributes.status != 'FINISHED'"
    for run in client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"]):
        with tempfile.TemporaryDirectory() as folder:
            try:
                got = client.download_artifacts(
                    run.info.run_id, f"{CHECKPOINT_FOLDER}/{identity}.pt", folder
                )
            except (MlflowException, OSError):  # this try died before its first upload
                continue
            with open(got, "rb") as source:
                write_atomic(path, lambda out: shutil.copyfileobj(source, out), mode="wb")
        print(f"checkpoint of run {run.info.run_id} fetched from MLflow", file=sys.stderr)
        return checkpoint.load(path)
    print("note: no checkpoint of these params and data to resume: a new run", file=sys.stderr)
    return None


def _reopenable(client, run_id: str) -> bool:
    """A run a resume may log into: it exists, is not deleted and has not FINISHED."""
    from pipeline.tracking.store import run_or_none

    run = run_or_none(client, run_id)
    return (
        run is not None
        and run.info.lifecycle_stage != "deleted"
        and (run.info.status != "FINISHED")
    )


def _supersede(client, experiment: str, identity: str, keep: str) -> None:
    """A new run of training `identity` replaces the unfinished ones before it: their uploaded
    checkpoints are deleted, so a later resume never brings one of them back."""
    query = f"tags.`train.identity` = '{identity}' and attributes.status != 'FINISHED'"
    for run in client.search_runs([experiment], query):
        if run.info.run_id != keep and client.list_artifacts(run.info.run_id, CHECKPOINT_FOLDER):
            _delete_checkpoint(client, run.info.run_id)


def _delete_checkpoint(client, run_id: str) -> None:
    from mlflow import get_tracking_uri
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        uri = client.get_run(run_id).info.artifact_uri
        repo = get_artifact_repository(uri, tracking_uri=get_tracking_uri())
        repo.delete_artifacts(CHECKPOINT_FOLDER)
    except Exception as exc:  # the run is finished either way; the upload is only space
        print(f"note: the run's uploaded checkpoint was not deleted ({exc})", file=sys.stderr)


def _run_exists(client, run_id: str) -> bool:
    """False also for a run deleted in the UI: MLflow cannot reopen it; a new run continues."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException:
        return False


if __name__ == "__main__":
    # The trainer decides how the run ends: a signal to the whole process group (a terminal's
    # Ctrl-C, a task's SIGTERM) reaches it, and it tells this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Same session, so the same scheduler group (Linux autogroup): the trainer's torch import
    # and epochs come first; this has until the first checkpoint to open the run.
    os.nice(10)
    from multiprocessing.connection import Connection

    import mlflow  # noqa: F401  the point: while the trainer imports torch

    # A store error goes back to the trainer, which reports it once (pipeline/cli).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

    _serve(Connection(int(sys.argv[1])))
    sys.stderr.flush()
    os._exit(0)  # the run is closed and nothing else is held: skip MLflow's teardown
