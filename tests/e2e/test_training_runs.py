"""Training as a user runs it: killed and resumed into the same MLflow run, and torchrun DDP."""

import json
import os
import pickle
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import project_env, run
from tests.e2e.live import kill_after_epoch

pytestmark = pytest.mark.slow
SMALL = [
    "--set",
    "train.model.name=cnn",
    "--set",
    "train.epochs=20",
    "--set",
    "train.model.dropout=0.1",
]


@pytest.fixture
def validated(from_template):
    return from_template("validated")


def _client(project) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")


def _runs(project):
    client = _client(project)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _weights(client, run_id, tmp) -> dict:
    path = client.download_artifacts(run_id, "weights/model.pt", str(tmp))
    return torch.load(path, weights_only=True)["state_dict"]


def _kill_after_epoch(project, epoch: int, sig=signal.SIGKILL, recorder_too=False) -> str:
    return kill_after_epoch(project, ["pipeline", "train", *SMALL], epoch, sig, recorder_too)


def _ended(project, run_id: str, seconds: int = 60):
    """The run once it is no longer RUNNING (its recorder ends it after the trainer went)."""
    client = _client(project)
    for _ in range(seconds * 4):
        found = client.get_run(run_id)
        if found.info.status != "RUNNING":
            return found
        time.sleep(0.25)
    raise AssertionError(f"run {run_id} still RUNNING after {seconds} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_training_ends_its_run_killed_and_keeps_its_checkpoint(validated, sig):
    said = _kill_after_epoch(validated, 2, sig)
    (stopped,) = _runs(validated)
    name = signal.Signals(sig).name
    assert stopped.info.status == "KILLED" and stopped.info.end_time is not None
    assert stopped.data.tags["train.interrupted"] == f"interrupted by {name}"
    assert f"stopped: interrupted by {name}" in said and "Traceback" not in said
    assert len(list((validated / "outputs" / "checkpoints").glob("*.pt"))) == 1


def test_a_training_that_fails_in_its_first_epoch_ends_its_run_failed_in_one_line(validated):
    # Before its first checkpoint the trainer has not yet heard from its MLflow recorder.
    diverging = ["train.optimizer.name=sgd", "train.optimizer.lr=1e12", "train.max_bad_steps=1"]
    sets = [a for s in [*diverging, "train.epochs=1"] for a in ("--set", s)]
    out = run(["pipeline", "train", *sets], validated, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: loss became NaN/Inf in epoch 1")
    (failed,) = _runs(validated)
    assert failed.info.status == "FAILED" and failed.info.end_time is not None


def test_a_run_left_running_by_sigkill_is_ended_killed_when_the_next_one_starts(validated):
    _kill_after_epoch(validated, 2, recorder_too=True)  # nobody left to close the run
    (left,) = _runs(validated)
    assert left.info.status == "RUNNING"
    listed = run(["pipeline", "status", "--running"], validated).stdout
    assert left.info.run_id in listed and "no live process: its process is gone" in listed
    uploaded = _client(validated).list_artifacts(left.info.run_id, "checkpoint")
    again = run(["pipeline", "train", *SMALL], validated)  # the same identity, no --resume
    ended = _client(validated).get_run(left.info.run_id)
    assert ended.info.status == "KILLED" and "ended without closing it" in again.stderr
    assert uploaded and not _client(validated).list_artifacts(left.info.run_id, "checkpoint")
    assert ended.data.tags["train.interrupted"].startswith("process ")


def test_a_trainer_gone_before_hearing_from_its_recorder_leaves_the_run_ended_killed(
    validated, monkeypatch
):
    # Killed in its first epoch: the recorder's "opened" is still unread, so the recorder's
    # pipe is reset (not closed) under it.
    from pipeline.config import load_config
    from pipeline.context import RunContext
    from pipeline.settings import Settings
    from pipeline.tracking import recorder

    for key, value in project_env(validated).items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env(validated)
    cfg = load_config(settings.params)
    validation = json.loads((settings.outputs / "validation.json").read_text())
    gone = {"host": socket.gethostname(), "pid": "4194304"}  # above Linux's pid_max
    opening = recorder.Opening(
        cfg, cfg, settings, validation, RunContext(), "digits", "i" * 16, "cpu", 1, gone
    )
    child = recorder.Child()
    child.open(opening)
    assert child.conn.poll(120)  # "opened" arrived, and is never read
    child.conn.close()
    assert child.proc.wait(timeout=60) == 0
    (ended,) = _runs(validated)
    assert ended.info.status == "KILLED"
    assert ended.data.tags["train.interrupted"] == (
        f"process 4194304 on {gone['host']} ended without closing it"
    )


@pytest.mark.parametrize("where", ["same host", "another host"])
def test_killed_training_resumes_into_the_same_run_and_matches_an_uninterrupted_one(
    validated, tmp_path, where
):
    """On another host (a checkpoint folder that holds nothing, as on a worker that shares no
    disk) the resume starts from the checkpoint the killed try uploaded to its MLflow run."""
    project = validated
    _kill_after_epoch(project, 3)
    (killed,) = _runs(project)
    killed = _ended(project, killed.info.run_id)  # the recorder saw its trainer go
    assert killed.info.status == "KILLED" and killed.info.end_time is not None
    assert killed.data.tags["train.interrupted"].endswith("ended without closing it")
    assert len(list((project / "outputs" / "checkpoints").glob("*.pt"))) == 1
    (uploaded,) = _client(project).list_artifacts(killed.info.run_id, "checkpoint")
    got = _client(project).download_artifacts(killed.info.run_id, uploaded.path, str(tmp_path))
    # the upload trails the local file by the epoch a kill may interrupt, never more
    uploaded_epoch = torch.load(got, weights_only=True)["epoch"]
    assert uploaded_epoch >= 2

    elsewhere = {"PIPELINE_CHECKPOINT_DIR": str(tmp_path / "empty")} if where != "same host" else {}
    resumed = run(["pipeline", "train", "--resume", *SMALL], project, env=elsewhere)
    assert f"resuming MLflow run {killed.info.run_id} after epoch" in resumed.stderr
    fetched = f"checkpoint of run {killed.info.run_id} fetched from MLflow"
    assert (fetched in resumed.stderr) == (where != "same host")
    assert "epoch   1/20" not in resumed.stderr and "epoch  20/20" in resumed.stderr
    client = _client(project)
    (after,) = _runs(project)  # no second run
    assert after.info.run_id == killed.info.run_id and after.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(after.info.run_id, "train_loss"))
    assert steps == list(range(1, 21))  # every epoch logged exactly once
    resumed_from = int(after.data.tags["train.resumed_from_epoch"])
    assert resumed_from == uploaded_epoch if elsewhere else resumed_from >= 3
    assert "train.interrupted" not in after.data.tags  # FINISHED, not "interrupted"
    checkpoints = tmp_path / "empty" if elsewhere else project / "outputs" / "checkpoints"
    assert not list(checkpoints.glob("*.pt"))  # cleaned up, here
    assert not client.list_artifacts(after.info.run_id, "checkpoint")  # and in the run
    if elsewhere:  # the first host's checkpoint is a leftover of a run finished elsewhere
        again = run(["pipeline", "train", "--resume", *SMALL], project)
        assert f"was left by run {after.info.run_id}, which has finished; removed" in (again.stderr)
        assert "no checkpoint of these params and data to resume: a new run" in again.stderr
        assert json.loads(again.stdout)["run_id"] != after.info.run_id
        kept = client.get_metric_history(after.info.run_id, "train_loss")
        assert sorted(m.step for m in kept) == list(range(1, 21))  # never trained into again
        (fresh,) = [r for r in _runs(project) if r.info.run_id != after.info.run_id]
        after = client.get_run(after.info.run_id)

    if not elsewhere:
        run(["pipeline", "train", *SMALL], project)  # the same params, uninterrupted
        fresh = next(r for r in _runs(project) if r.info.run_id != after.info.run_id)
    a = _weights(client, after.info.run_id, tmp_path / "a")
    b = _weights(client, fresh.info.run_id, tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for key in ("val_loss", "val_accuracy", "train_loss"):
        assert after.data.metrics.get(key) == client.get_run(fresh.info.run_id).data.metrics[key]


def test_a_later_try_ends_the_run_an_earlier_try_left_running_on_another_host(
    validated, monkeypatch
):
    """A lost worker cannot close its run, and no process on this host can tell whether it
    lives: a later try of the same orchestrator run knows the earlier one is over."""
    from pipeline.config import load_config
    from pipeline.context import RunContext
    from pipeline.settings import Settings
    from pipeline.stages.train import _training_identity, train_stage
    from pipeline.tracking import store

    for key, value in project_env(validated).items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env(validated)
    cfg = load_config(settings.params, {"train.epochs": 1})
    validation = json.loads((settings.outputs / "validation.json").read_text())
    ids = {"dag_id": "train_image_classifier", "run_id": "manual__1"}
    first, second = (RunContext("airflow", {**ids, "try_number": n}) for n in (1, 2))
    identity = _training_identity(cfg, validation["data_md5"], first)
    lost = {"train.identity": identity, "train.host": "worker-a", "train.pid": "4242"}
    experiment = store.configure(settings, cfg.tracking.experiment)
    client = _client(validated)
    an_hour_ago = int((time.time() - 3600) * 1000)
    left = client.create_run(experiment, an_hour_ago, {**lost, **first.run_tags()}).info.run_id
    other = client.create_run(experiment, tags={**lost, **second.run_tags()}).info.run_id
    (listed,) = [
        r
        for r in json.loads(run(["pipeline", "status", "--running", "--json"], validated).stdout)
        if r["run_id"] == left
    ]
    assert (listed["host"], listed["pid"], listed["verdict"]) == ("worker-a", "4242", "silent")

    trained = train_stage(cfg, settings, validation, second.with_(resume=True))
    ended = client.get_run(left)
    assert ended.info.status == "KILLED"
    assert (
        ended.data.tags["train.interrupted"] == "process 4242 on worker-a ended without closing it"
    )
    assert client.get_run(other).info.status == "RUNNING"  # the same try's: maybe alive
    assert client.get_run(trained["run_id"]).info.status == "FINISHED"


class _Exploit:
    """Unpickling this runs a shell command; a checkpoint loader must never do that."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_malicious_checkpoint_stops_resume_with_a_clear_error(validated):
    project = validated
    _kill_after_epoch(project, 2)
    (ckpt,) = (project / "outputs" / "checkpoints").glob("*.pt")
    marker = project / "pwned"
    ckpt.write_bytes(pickle.dumps(_Exploit(f"touch {marker}"), protocol=2))
    out = run(["pipeline", "train", "--resume", *SMALL], project, check=False)
    assert out.returncode == 1 and "refusing checkpoint" in out.stderr
    assert not marker.exists()


def test_torchrun_two_processes_train_one_run_logged_by_rank_zero(validated):
    project = validated
    out = run(
        [
            "pipeline",
            "train",
            "--nproc",
            "2",
            "--set",
            "train.model.name=mlp",
            "--set",
            "train.epochs=3",
        ],
        project,
    )
    (only,) = _runs(project)
    assert only.data.tags["train.processes"] == "2"
    assert only.info.status == "FINISHED" and only.data.metrics["val_accuracy"] > 0.8
    assert out.stderr.count("epoch   3/3") == 1  # one reporting process
    history = _client(project).get_metric_history(only.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]


def _two_machines(
    a: Path, b: Path, rdzv: str, *args: str, kill_after: int = 0, b_too: tuple = (), ok=True
) -> list[str]:
    """`pipeline train --nnodes 2` run in workspaces `a` and `b` (as on two machines: `b` has
    no hand-off of `a`'s, each its own checkpoint folder) meeting at a c10d rendezvous, with one
    MLflow store; `kill_after`: SIGKILL both machines' processes once an epoch is reported. What
    each said on stderr."""
    import subprocess
    import threading

    from tests.conftest import BIN, free_port

    command = [str(BIN / "pipeline"), "train", "--nnodes", "2", "--nproc", "1",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", rdzv,
               "--join-timeout", "120", *args]  # fmt: skip
    tracking = {"MLFLOW_TRACKING_URI": f"sqlite:///{a}/.mlflow/mlflow.db"}
    said, reported = [[], []], threading.Event()
    procs = [
        subprocess.Popen([*command, *more], cwd=p, env={**project_env(p), **tracking}, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        for p, more in ((a, ()), (b, b_too))
    ]  # fmt: skip

    def read(i: int) -> None:
        for line in procs[i].stderr:
            said[i].append(line)
            if kill_after and line.startswith(f"epoch {kill_after:>3}/"):
                reported.set()

    readers = [threading.Thread(target=read, args=(i,)) for i in (0, 1)]
    for reader in readers:
        reader.start()
    if kill_after:
        import psutil

        assert reported.wait(300), "".join(said[0] + said[1])[-3000:]
        for proc in procs:  # torchrun's workers leave their launcher's process group
            tree = psutil.Process(proc.pid)
            for each in [tree, *tree.children(recursive=True)]:
                each.kill()
    for proc, reader in zip(procs, readers, strict=True):
        proc.wait(timeout=300)
        reader.join()
    text = ["".join(s) for s in said]
    if not kill_after and ok:
        assert [p.returncode for p in procs] == [0, 0], (text[0] + text[1])[-3000:]
    return text


def test_two_machines_train_one_run_and_resume_it_in_step(validated, from_template, tmp_path):
    """Two workspaces that share no file, as two machines: only one holds validate's hand-off,
    each its own checkpoints. They train one MLflow run; killed together mid-run and started
    again with --resume (rank 0 may now be the other machine, which then takes the checkpoint
    from the run), they continue it from one epoch, to the weights of an uninterrupted run."""
    a, b = validated, from_template("validated", "node-b")
    (b / "outputs" / "validation.json").unlink()  # validated on a only
    recipe = ["--set", "train.model.name=cnn", "--set", "train.epochs=6"]
    _two_machines(a, b, "whole", *recipe)
    (whole,) = _runs(a)
    assert whole.data.tags["train.processes"] == "2" and whole.info.status == "FINISHED"
    for workspace in (a, b):  # each machine hands on the run, whichever was rank 0
        handed = json.loads((workspace / "outputs" / "train.json").read_text())
        assert handed["run_id"] == whole.info.run_id

    _two_machines(a, b, "killed", *recipe, kill_after=3)
    killed = next(r for r in _runs(a) if r.info.run_id != whole.info.run_id)
    said = _two_machines(a, b, "resumed", "--resume", *recipe)
    assert sum(f"resuming MLflow run {killed.info.run_id}" in s for s in said) == 1, said
    assert not any("epoch   1/6" in s for s in said)
    (after,) = [r for r in _runs(a) if r.info.run_id != whole.info.run_id]  # no third run
    assert after.info.run_id == killed.info.run_id and after.info.status == "FINISHED"
    client = _client(a)
    steps = sorted(m.step for m in client.get_metric_history(after.info.run_id, "train_loss"))
    assert steps == list(range(1, 7))  # every epoch logged exactly once
    assert int(after.data.tags["train.resumed_from_epoch"]) >= 1
    ours = _weights(client, after.info.run_id, tmp_path / "a")
    theirs = _weights(client, whole.info.run_id, tmp_path / "b")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    "b_too", [("--set", "train.optimizer.lr=0.01"), ("--resume",)], ids=["recipe", "resume"]
)
def test_machines_that_would_train_different_recipes_train_nothing(validated, from_template, b_too):
    """Each machine's params.yaml, --set and --resume are its own: rank 0 alone would decide,
    dropping the others' silently, so the ranks refuse to train unless they agree."""
    a, b = validated, from_template("validated", "node-b")
    said = _two_machines(a, b, "mixed", "--set", "train.epochs=2", b_too=b_too, ok=False)
    assert "the ranks disagree on the training params (params hash) and --resume" in "".join(said)
    assert not [r for r in _runs(a) if r.info.status == "FINISHED"]


def test_a_machine_alone_at_its_rendezvous_fails_after_the_join_timeout_saying_so(validated):
    from tests.conftest import free_port

    rendezvous = ["--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "alone"]
    command = ["pipeline", "train", "--nnodes", "2", *rendezvous, "--join-timeout", "5"]
    said = run(command, validated, check=False)
    assert said.returncode != 0
    assert "not all 2 machines joined within 5 s" in said.stderr, said.stderr[-3000:]
    assert "Run the same command on every machine, with the same --rdzv-id" in said.stderr
    assert _runs(validated) == []


@pytest.mark.parametrize(
    "args, says",
    [
        (["--nnodes", "2"], "needs --rdzv-endpoint HOST:PORT"),
        (["--nproc", "0"], "--nproc, --nnodes and --join-timeout are at least 1"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--rdzv-id", "x", "--join-timeout", "0"],
         "--nproc, --nnodes and --join-timeout are at least 1"),
        (["--rdzv-id", "x"], "give --nnodes too"),
    ],
)  # fmt: skip
def test_a_multi_machine_training_without_its_rendezvous_is_refused(validated, args, says):
    said = run(["pipeline", "train", *args], validated, check=False)
    assert said.returncode == 2 and says in said.stderr, said.stderr


def test_lr_auto_trains_with_the_range_tests_lr_and_records_the_number(validated, tmp_path):
    auto = ["--set", "train.optimizer.lr=auto", "--set", "train.epochs=2"]
    found = json.loads(run(["pipeline", "lr-find"], validated).stdout)
    assert found["suggested_lr"] > 0 and not found["reused"]
    first = json.loads(run(["pipeline", "train", *auto], validated).stdout)["run_id"]
    second = json.loads(run(["pipeline", "train", *auto], validated).stdout)["run_id"]
    client = _client(validated)
    finders = [r for r in _runs(validated) if r.info.run_name.startswith("lr-find")]
    assert len(finders) == 2  # the CLI's own, and one for these params + data: found again
    for run_id in (first, second):
        trained = client.get_run(run_id).data
        finder = client.get_run(trained.tags["lr_find.run_id"])
        lr = float(trained.params["train.optimizer.lr"])  # a number: reproducible from params
        assert lr == pytest.approx(finder.data.metrics["suggested_lr"])
        assert trained.tags["train.optimizer.lr_given"] == "auto"
    assert client.get_run(first).data.tags["lr_find.run_id"] == finder.info.run_id
    plots = {a.path for a in client.list_artifacts(finder.info.run_id, "plots")}
    assert plots == {"plots/lr_find.png"}
    losses = client.get_metric_history(finder.info.run_id, "smoothed_loss")
    assert len(losses) == int(finder.data.params["steps"]) and len(losses) > 20


def test_a_last_batch_of_one_under_batch_norm_joins_the_batch_before_it(validated):
    # digits: 1438 training images, 1295 after the 10 % validation split = 2 x 647 + 1: batch
    # size 647 would end each epoch in a batch of one image, which resnet18's norms refuse.
    args = ["--set", "train.model.name=resnet18", "--set", "train.epochs=1"]
    result = run(["pipeline", "train", *args, "--set", "train.batch_size=647"], validated)
    assert "leave a last batch of 1" in result.stderr and "(648 images)" in result.stderr
    run_id = json.loads((validated / "outputs" / "train.json").read_text())["run_id"]
    assert _client(validated).get_run(run_id).data.tags["train.last_batch"] == "merged"
    logged = _client(validated).download_artifacts(run_id, "history.json", str(validated))
    assert json.loads(Path(logged).read_text())["steps_per_epoch"] == 2  # not 3


_ON_NODES = """
import json, sys
from pipeline.config import load_config
from pipeline.context import RunContext
from pipeline.settings import Settings
from pipeline.stages.nodes import train_on_nodes
from pipeline.training.distributed import Nodes

settings = Settings.from_env()
cfg = load_config(settings.params, {"train.model.name": "mlp", "train.epochs": 2})
validation = json.loads((settings.outputs / "validation.json").read_text())
validation |= json.loads(sys.argv[1])
ctx = RunContext(origin="airflow", ids={"dag_id": "d", "run_id": "r", "try_number": 1})
try:
    print(json.dumps(train_on_nodes(cfg, settings, validation, ctx, Nodes(nproc=2))))
except Exception as exc:
    print(json.dumps({"raised": type(exc).__name__, "message": str(exc)}))
"""


def test_a_dag_tasks_training_on_nodes_hands_on_rank_zeros_run_and_its_permanent_errors(
    validated,
):
    """What the DAG's train and train_peer tasks call: the config, hand-off and RunContext
    reach every torchrun process, rank 0's result comes back, and a rank's permanent error
    comes back as one (the task then fails without retries), not as a torchrun exit code."""
    project = validated
    trained = json.loads(run(["python", "-c", _ON_NODES, "{}"], project).stdout)
    (only,) = _runs(project)
    assert trained["run_id"] == only.info.run_id and only.info.status == "FINISHED"
    assert only.data.tags["train.processes"] == "2"
    assert only.data.tags["airflow.dag_id"] == "d" and only.data.tags["airflow.run_id"] == "r"
    wrong = json.dumps({"data_md5": "0" * 32})
    refused = json.loads(run(["python", "-c", _ON_NODES, wrong], project).stdout)
    assert refused["raised"] == "PermanentError", refused
    assert refused["message"].startswith("DataError: ") and "0" * 32 in refused["message"]
    assert len(_runs(project)) == 1  # nothing trained on the unvalidated version
