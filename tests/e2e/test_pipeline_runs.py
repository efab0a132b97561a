"""End to end on a fresh copy of the project: the Airflow DAG, `dvc repro` and the CLI."""

import ast
import json
import signal
import subprocess

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.data.versioning import recorded_md5
from pipeline.files import write_json
from tests.conftest import add_make_files, git, project_env, run

pytestmark = pytest.mark.slow
DAG = "train_image_classifier"


def _client(project):
    return MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")


def _status(project) -> list[dict]:
    return json.loads(run(["pipeline", "status", "--json"], project).stdout)


def _dag_test(project, check=True, conf: dict | None = None, env=None):
    extra = ["-c", json.dumps(conf)] if conf else []
    return run(["airflow", "dags", "test", DAG, *extra], project, check=check, env=env)


@pytest.fixture
def airflow_project(from_template):
    """Digits pulled; the Airflow DB migrated with the DAGs' pools, as `make run` leaves it."""
    return from_template("airflow")


def _make_run(project) -> str:
    """`make run` in the project copy, sharing the already-installed virtual environment."""
    add_make_files(project)
    return run(["make", "-o", ".venv/.installed", "run"], project).stdout  # never reinstall


@pytest.mark.long
def test_make_run_takes_digits_to_a_champion_and_keeps_exactly_one(project):
    summary = _make_run(project)
    assert "validation     passed" in summary
    assert f"digits md5 {recorded_md5(project)}" in summary
    assert "registered     image-classifier version 1 aliases: challenger, champion" in summary
    assert "mlflow ui --backend-store-uri" in summary
    (model,) = _status(project)
    (v1,) = model["versions"]
    assert v1["aliases"] == ["challenger", "champion"] and v1["test_accuracy"] >= 0.97
    assert v1["data_md5"] == recorded_md5(project)

    run_ = _client(project).get_run(v1["run_id"])
    tags, params = run_.data.tags, run_.data.params
    assert tags["airflow.dag_id"] == DAG and tags["airflow.run_id"].startswith("manual__")
    assert tags["airflow.try_number"] == "1"
    assert tags["git.commit"] == git(project, "rev-parse", "HEAD").strip()
    assert tags["data.md5"] == recorded_md5(project) and tags["validation.success"] == "true"
    assert params["train.optimizer.name"] == "adamw" and params["train.schedule.name"] == "cosine"
    artifacts = {a.path for a in _client(project).list_artifacts(v1["run_id"], "plots")}
    assert {"plots/confusion_matrix.png", "plots/learning_curves.png", "plots/lr_schedule.png"} <= (
        artifacts
    )
    history = _client(project).get_metric_history(v1["run_id"], "val_loss")
    assert len(history) == 12
    explained = {a.path for a in _client(project).list_artifacts(v1["run_id"], "explain")}
    assert {"explain/summary.json", "explain/class_means.png"} <= explained  # the explain task
    # validate's Data Docs reach the training run through MLflow (train may run elsewhere)
    (checked,) = _client(project).search_runs(
        [run_.info.experiment_id],
        f"tags.`airflow.run_id` = '{tags['airflow.run_id']}' and attributes.status = 'FINISHED'"
        " and attributes.run_name = 'validation-passed-digits'",
    )
    docs = {a.path for a in _client(project).list_artifacts(v1["run_id"], "data_docs")}
    assert "data_docs/index.html" in docs
    assert docs == {
        a.path for a in _client(project).list_artifacts(checked.info.run_id, "data_docs")
    }
    card = open(_client(project).download_artifacts(v1["run_id"], "model_card.md")).read()
    assert "## Explanations" in card and "`integrated_gradients` (" in card  # before register

    # A shorter recipe from the trigger form: above the floor, below the champion -> not promoted.
    _dag_test(project, conf={"optimizer": "sgd", "lr": 0.05, "epochs": 3})
    (model,) = _status(project)
    v1, v2 = model["versions"]
    assert v1["aliases"] == ["champion"] and v2["aliases"] == ["challenger"]
    assert v2["test_accuracy"] < v1["test_accuracy"]
    weak = _client(project).get_run(v2["run_id"]).data.params
    assert (weak["train.optimizer.name"], weak["train.epochs"]) == ("sgd", "3")
    decision = _client(project).get_model_version("image-classifier", "2").tags
    assert decision["promotion.rule"] == "improvement"
    assert (
        "vs champion's" in decision["promotion.decision"]
        and "< the required" in (decision["promotion.decision"])
    )
    assert decision["registration.status"] == "complete"
    assert git(project, "status", "--porcelain") == ""

    # Same data, params and code as the champion: the next run records a skip, trains nothing.
    again = run(["make", "-o", ".venv/.installed", "run"], project).stdout
    assert "nothing trained" in again and "force_retrain=true" in again
    assert f"champion v1 (run {v1['run_id']})" in again
    (model,) = _status(project)
    assert len(model["versions"]) == 2
    (skipped,) = _client(project).search_runs(
        [e.experiment_id for e in _client(project).search_experiments()],
        "tags.`pipeline.skipped` = 'true'",
    )
    assert skipped.data.tags["skip.champion_run_id"] == v1["run_id"]
    assert skipped.data.tags["airflow.dag_id"] == DAG and not skipped.data.metrics

    _dag_test(project, conf={"force_retrain": True})
    (model,) = _status(project)
    assert len(model["versions"]) == 3
    assert sum("champion" in v["aliases"] for v in model["versions"]) == 1
    assert git(project, "status", "--porcelain") == ""


def test_failed_validation_stops_the_dag_before_training(airflow_project, webhook):
    project = airflow_project
    url, alerts = webhook
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validate"]["min_rows_per_split"] = 10_000
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = _dag_test(
        project, check=False, env={"PIPELINE_ALERT_URLS": url.replace("http://", "json://")}
    )
    log = result.stdout + result.stderr
    assert "min_rows" in log and "ValidationFailed" in log
    (alert,) = alerts  # one alert, from the failed task (no retries: it cannot fix itself)
    assert alert["title"].endswith(".validate") and "min_rows" in alert["message"]
    assert "[DAG TEST] starting task_id=train" not in log
    # On record in MLflow: one FAILED run with the summary and the Data Docs, and no model.
    (failed,) = _client(project).search_runs(
        [e.experiment_id for e in _client(project).search_experiments()]
    )
    assert failed.info.status == "FAILED" and failed.data.tags["validation.success"] == "false"
    assert "train.min_rows" in failed.data.tags["validation.failed_expectations"]
    assert int(failed.data.tags["validation.failed"]) >= 2  # train and test are both too small
    assert failed.data.tags["airflow.dag_id"] == DAG
    artifacts = {a.path for a in _client(project).list_artifacts(failed.info.run_id)}
    assert {"validation.json", "data_docs"} <= artifacts
    assert _status(project) == []
    assert (
        project
        / "outputs"
        / "gx"
        / "gx"
        / "uncommitted"
        / "data_docs"
        / "local_site"
        / "index.html"
    ).exists()


@pytest.mark.long
def test_dvc_repro_reproduces_and_exp_run_overrides(project):
    run(["pipeline", "data", "pull"], project)
    out = run(["dvc", "repro"], project)
    assert "Running stage 'register'" in out.stdout
    assert "up to date" in run(["dvc", "status"], project).stdout
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.97
    (model,) = _status(project)
    assert model["versions"][0]["aliases"] == ["challenger", "champion"]
    retried = json.loads(run(["pipeline", "register"], project).stdout)  # a retried register
    assert retried["version"] == 1 and len(_status(project)[0]["versions"]) == 1

    git(project, "add", "-A")
    git(project, "commit", "-qm", "lock")
    run(["dvc", "exp", "run", "-S", "train.optimizer.name=adam"], project)
    client = _client(project)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.params["train.optimizer.name"] for r in runs) == ["adam", "adamw"]
    (model,) = _status(project)  # an experiment in the workspace registers a challenger only
    assert [v["aliases"] for v in model["versions"]] == [["champion"], ["challenger"]]


def test_cli_refuses_bad_config_unvalidated_and_untracked_data(project):
    run(["pipeline", "data", "pull"], project)
    bad = run(["pipeline", "train", "--set", "train.optimizer.lr=-1"], project, check=False)
    assert bad.returncode == 2 and "train.optimizer.lr" in bad.stderr

    unvalidated = run(["pipeline", "train"], project, check=False)
    assert unvalidated.returncode == 1 and "pipeline validate" in unvalidated.stderr

    run(["pipeline", "validate"], project)
    images = np.load(project / "data" / "test_images.npy")
    images[0] = 0
    np.save(project / "data" / "test_images.npy", images)
    tampered = run(["pipeline", "train"], project, check=False)
    assert tampered.returncode == 1
    assert "does not match data.dvc" in tampered.stderr and "test_images.npy" in tampered.stderr
    assert not (project / ".mlflow").exists() or _status(project) == []


def test_stages_called_out_of_order_name_the_stage_to_run_first(from_template):
    project = from_template("validated")
    run(["pipeline", "train", "--set", "train.epochs=1"], project)
    earlier = {"run_id": "0" * 32, "test_accuracy": 0.99}  # as git or an earlier run left it
    write_json(project / "reports" / "metrics.json", earlier)
    run_id = json.loads((project / "outputs" / "train.json").read_text())["run_id"]
    for stage in ("explain", "register"):
        early = run(["pipeline", stage], project, check=False)
        assert early.returncode == 1, early.stderr
        (line,) = early.stderr.strip().splitlines()  # one line, no traceback
        assert f"but the train hand-off is of run {run_id}; run `pipeline evaluate` first" in line
    by_id = run(["pipeline", "register", "--run-id", run_id], project, check=False)
    assert by_id.returncode == 1 and "Traceback" not in by_id.stderr
    assert f"run `pipeline evaluate` (or `pipeline evaluate --run-id {run_id}`) first" in (
        by_id.stderr
    )
    assert _client(project).search_registered_models() == []  # nothing registered


def test_a_misspelled_trigger_conf_key_fails_the_first_task_naming_it(airflow_project):
    # Airflow merges unknown conf keys into the params: the run would succeed on the defaults.
    result = _dag_test(airflow_project, check=False, conf={"learning_rate": 0.1, "epochs": 1})
    log = result.stdout + result.stderr
    assert "unknown key(s) in the trigger conf: learning_rate;" in log
    assert "train_image_classifier takes batch_size, dataset, epochs," in log  # the known ones
    assert "[DAG TEST] starting task_id=validate" not in log
    assert not (airflow_project / ".mlflow").exists() or _status(airflow_project) == []


def _resolved(project, conf: dict) -> dict:
    """The config check_data resolves from params.yaml and a trigger conf (its XCom value)."""
    out = run(["airflow", "tasks", "test", DAG, "check_data", "-t", json.dumps(conf)], project)
    (line,) = [x for x in out.stdout.splitlines() if "Returned value was:" in x]
    return ast.literal_eval(line[line.index("{") : line.rindex("} [") + 1])["config"]


def test_a_typed_trigger_value_wins_over_a_preset_even_when_it_equals_params_yaml(
    airflow_project,
):
    # params.yaml trains 12 epochs, the preset 8: a user who types 12 gets 12 ...
    assert (
        _resolved(airflow_project, {"preset": "fast-cnn-digits", "epochs": 12})["train"]["epochs"]
        == 12
    )
    # ... and the form's empty fields (the UI sends them as null) leave the preset's 8 alone.
    untouched = {"preset": "fast-cnn-digits", "epochs": None, "model": None, "lr": None}
    assert _resolved(airflow_project, untouched)["train"]["epochs"] == 8


def test_sweep_dag_logs_child_runs_under_one_parent_and_reports_the_best(airflow_project):
    project = airflow_project
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sweep"] = {
        "optimizers": ["sgd", "adamw"],
        "schedules": ["cosine"],
        "lrs": [0.01],
        "epochs": 2,
        "register_best": True,
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run(["airflow", "dags", "test", "sweep_image_classifier"], project)
    client = _client(project)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, "tags.`sweep.grid` != ''")
    children = client.search_runs(
        experiments, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2 and parent.info.status == "FINISHED"
    assert {c.data.params["train.optimizer.name"] for c in children} == {"sgd", "adamw"}
    # The best is chosen on validation (the lowest last-epoch val_loss), never on test.
    best = min(children, key=lambda c: c.data.metrics["val_loss"])
    assert parent.data.tags["sweep.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_loss"] == best.data.metrics["val_loss"]
    assert parent.data.metrics["best_test_accuracy"] == best.data.metrics["test_accuracy"]
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    files |= {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"sweep_results.json", "sweep_results.md", "plots/sweep_curves.png"} <= files
    (model,) = _status(project)  # register_best: the best trial went through the policy
    assert [v["run_id"] for v in model["versions"]] == [best.info.run_id]


def test_the_dag_streams_a_dataset_over_the_resident_budget_from_disk(airflow_project):
    project = airflow_project
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"] |= {"resident_max_mb": 0, "epochs": 2}  # nothing fits: every split streams
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _dag_test(project)
    (model,) = _status(project)
    (version,) = model["versions"]
    assert version["aliases"] == ["challenger", "champion"] and version["test_accuracy"] > 0.9
    run = _client(project).get_run(version["run_id"])
    assert run.data.tags["train.loader"] == "stream"
    assert {"val_loss", "test_accuracy"} <= set(run.data.metrics)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_airflow_dags_test_interrupted_in_training_ends_the_run_killed(airflow_project, sig):
    project = airflow_project
    conf = {"model": "cnn", "epochs": 30}
    proc = subprocess.Popen(
        ["airflow", "dags", "test", DAG, "-c", json.dumps(conf)],
        cwd=project,
        env=project_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if "epoch   2/30" in line:
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()
    proc.wait(timeout=120)  # bounded: the signal is not ignored
    client = _client(project)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (trained,) = client.search_runs(experiments, "tags.`train.identity` != ''")
    assert trained.info.status == "KILLED", rest[-3000:]
    assert trained.data.tags["train.interrupted"] == f"interrupted by {signal.Signals(sig).name}"
    assert "epoch  30/30" not in rest


def test_training_on_more_machines_than_come_fails_once_saying_what_to_start(airflow_project):
    """`airflow dags test` runs one task at a time: the train task's rendezvous for 2 machines
    (or the peer waiting for it) sees one, and the run fails without retrying, naming the fix."""
    env = {**project_env(airflow_project), "PIPELINE_JOIN_TIMEOUT_S": "15"}
    result = _dag_test(airflow_project, check=False, conf={"nodes": 2, "epochs": 1}, env=env)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "run 2 workers on that queue, one per machine" in log, log[-5000:]
    assert "give the pool 2 slots" in log
    assert "[DAG TEST] starting task_id=evaluate" not in log
    # no retry: waiting again brings no more machines; the peer then stops at once, skipped,
    # and the run alerts once
    assert "AirflowFailException: NodesDidNotMeet: the 2-machine training at" in log
    assert "the train task gave up: NodesDidNotMeet" in log
    assert log.count("ALERT train_image_classifier.") == 1
