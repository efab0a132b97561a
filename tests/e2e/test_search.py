"""The Optuna sweep: a DAG run whose weak trials are pruned and show so in MLflow, a worker
killed mid-trial whose retry resumes that trial, two workers sharing a study on PostgreSQL, and
search spaces refused by the key."""

import json
import signal
import subprocess

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.config import ConfigError, config_from_dict
from pipeline.stages.sweep.search import check_space
from tests.conftest import project_env, run

pytestmark = pytest.mark.slow
SPACE = {
    "train.model.name": {"choice": ["mlp"]},
    "train.optimizer.lr": {"choice": [0.01, 0.00001]},  # the second barely learns: pruned
    "train.optimizer.name": {"choice": ["adamw"]},
}


def _optuna_params(project, **optuna_cfg) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sweep"] |= {"strategy": "optuna", "epochs": 3, "register_best": False}
    params["sweep"]["optuna"] = {"trials": 4, "workers": 2, "pruner": "successive_halving",
                                 "space": SPACE, **optuna_cfg}  # fmt: skip
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def _client(project) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")


def _study(project, name="sweep-digits"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{project}/.mlflow/optuna.db")


def test_the_optuna_sweep_dag_prunes_weak_trials_and_shows_them_pruned(from_template):
    project = from_template("airflow")
    _optuna_params(project)
    run(["airflow", "dags", "test", "sweep_image_classifier"], project)
    client = _client(project)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, "tags.`sweep.strategy` = 'optuna'")
    children = client.search_runs(
        experiments, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 4 and parent.info.status == "FINISHED"
    pruned = [c for c in children if c.data.tags.get("sweep.pruned") == "true"]
    assert pruned and all(c.info.status == "KILLED" for c in pruned)
    assert all(int(c.data.tags["sweep.pruned_at_epoch"]) < 3 for c in pruned)
    states = {t.state.name for t in _study(project).trials}
    assert "PRUNED" in states and "COMPLETE" in states
    assert parent.data.metrics["trial_epochs"] < 4 * 3  # pruning saved epochs
    best = client.get_run(parent.data.tags["sweep.best_run_id"])
    assert best.data.params["train.optimizer.lr"] == "0.01" and best.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/search_optimization_history.png" in files
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep_results.json"}


KILL_IN_FIRST_TRIAL = """
import os, signal, sys
from pipeline import interrupts
from pipeline.tracking import recorder
logged = recorder.Recorder.epoch
def dying(self, row, checkpoint=None):
    logged(self, row, checkpoint)
    if row["epoch"] == 2:
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
recorder.Recorder.epoch = dying if sys.argv[1].startswith("SIG") else logged
from pipeline.config import load_config
from pipeline.settings import Settings
from pipeline.context import RunContext
from pipeline.stages import sweep
from pipeline.stages.sweep import search
import json
settings = Settings.from_env()
cfg = load_config(settings.params)
validation = json.loads((settings.outputs / "validation.json").read_text())
ids = {"dag_id": "sweep_image_classifier", "run_id": sys.argv[2], "try_number": 1}
ctx = RunContext("airflow", ids)
parent = sweep.start(cfg, settings, ctx)["parent"]
with interrupts.raising_on_signals():  # as the CLI and the DAG tasks do
    sweep.trial_stage(cfg, settings, validation, parent, {"worker": 0}, ctx)
print(json.dumps(search.finish(cfg, settings, parent)))
"""


def test_a_worker_killed_mid_trial_is_retried_into_the_same_trial_run(from_template):
    project = from_template("validated")
    _optuna_params(project, trials=2, pruner="none")
    cmd = ["python", "-c", KILL_IN_FIRST_TRIAL]
    killed = subprocess.run([*cmd, "SIGKILL", "manual__1"], cwd=project, env=project_env(project))
    assert killed.returncode == -signal.SIGKILL
    (left,) = _study(project).trials
    assert left.state.name == "RUNNING"  # nobody told the study
    run([*cmd, "retry", "manual__1"], project)  # the task's retry: same DAG run, same worker
    trials = _study(project).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    retried = trials[1]
    assert retried.user_attrs["retry_of"] == 0 and retried.params == left.params
    client = _client(project)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (first,) = client.search_runs(experiments, "tags.`sweep.trial` = '1'")
    assert first.data.tags["train.resumed_from_epoch"] == "2"  # the killed trial's checkpoint
    assert first.info.status == "FINISHED"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_an_interrupted_worker_fails_its_trial_and_ends_its_runs_killed(from_template, sig):
    project = from_template("validated")
    _optuna_params(project, trials=2, pruner="none")
    stopped = run(["python", "-c", KILL_IN_FIRST_TRIAL, sig, "manual__1"], project, check=False)
    assert stopped.returncode != 0 and f"Interrupted: interrupted by {sig}" in stopped.stderr
    (trial,) = _study(project).trials
    assert trial.state.name == "FAIL" and trial.user_attrs["ended"] == f"interrupted by {sig}"
    client = _client(project)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}  # trial and parent


def test_a_trial_left_running_by_a_dead_process_fails_when_the_study_next_starts(
    from_template,
):
    project = from_template("validated")
    _optuna_params(project, trials=2, pruner="none")
    cmd = ["python", "-c", KILL_IN_FIRST_TRIAL]
    subprocess.run([*cmd, "SIGKILL", "manual__1"], cwd=project, env=project_env(project))
    again = run([*cmd, "go", "manual__2"], project)  # another DAG run: no retry of that trial
    assert "note: trial 0 failed: its process" in again.stdout
    assert [t.state.name for t in _study(project).trials] == ["FAIL", "COMPLETE", "COMPLETE"]


@pytest.mark.parametrize(
    ("space", "named"),
    [
        ({"train.optimizer.name": {"choice": []}}, "train.optimizer.name"),
        ({"train.optimizer.lr": {"low": 0.1, "high": 0.01}}, "train.optimizer.lr"),
        ({"train.optimizer.lrr": {"low": 0.01, "high": 0.1}}, "train.optimizer.lrr"),
        ({"train.optimizer.name": {"choice": ["sgd", "adamx"]}}, "train.optimizer.name"),
        ({"train.batch_size": {"low": 0, "high": 64}}, "train.batch_size"),
    ],
)
def test_bad_search_spaces_are_refused_with_the_key_named(space, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        cfg = config_from_dict({}, {"sweep.strategy": "optuna", "sweep.optuna.space": space})
        check_space(cfg)


TWO_WORKERS = """
import json, sys
from pipeline.config import load_config
from pipeline.settings import Settings
from pipeline.context import RunContext
from pipeline.stages.sweep import search
settings = Settings.from_env()
cfg = load_config(settings.params)
validation = json.loads((settings.outputs / "validation.json").read_text())
search.worker(cfg, settings, validation, sys.argv[1], int(sys.argv[2]), RunContext())
"""


@pytest.mark.integration
def test_two_workers_share_a_postgresql_study_without_colliding(from_template, new_database):
    """The production storage (PIPELINE_OPTUNA_STORAGE on PostgreSQL) with two workers at once.
    Regression: both workers drew the same first trial (one seed) and raced on its checkpoint
    file; now each samples with its own seed and keeps its own checkpoints."""
    project = from_template("validated")
    space = {"train.model.name": {"choice": ["mlp"]},
             "train.optimizer.lr": {"low": 0.001, "high": 0.1, "log": True}}  # fmt: skip
    _optuna_params(project, trials=4, pruner="none", space=space)
    storage = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{new_database('optuna')}"
    env = project_env(project) | {"PIPELINE_OPTUNA_STORAGE": storage}
    start = subprocess.run(["python", "-c", START], cwd=project, env=env, capture_output=True,
                           text=True, check=True)  # fmt: skip
    parent = json.loads(start.stdout)["parent"]
    procs = [
        subprocess.Popen(["python", "-c", TWO_WORKERS, parent, str(i)], cwd=project, env=env,
                         stderr=subprocess.PIPE, text=True)
        for i in (0, 1)
    ]  # fmt: skip
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    assert not (project / ".mlflow" / "optuna.db").exists()  # nothing went to the SQLite default
    trials = optuna.load_study(study_name="sweep-digits", storage=storage).trials
    assert len(trials) >= 4 and all(t.state.name == "COMPLETE" for t in trials)
    firsts = {t.user_attrs["worker"]: t.params for t in reversed(trials)}
    assert firsts["cli/0"] != firsts["cli/1"]


START = """
import json
from pipeline.config import load_config
from pipeline.settings import Settings
from pipeline.stages import sweep
settings = Settings.from_env()
print(json.dumps(sweep.start(load_config(settings.params), settings)))
"""
