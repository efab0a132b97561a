"""The DAG file: imports cleanly, is wired as documented, and stays light to parse."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import REPO

DAG_ID = "train_image_classifier"


@pytest.fixture(scope="module", autouse=True)
def dags_on_path():
    """Airflow puts the DAG folder on sys.path (the DAGs import dag_support from it)."""
    sys.path.insert(0, str(REPO / "dags"))
    yield
    sys.path.remove(str(REPO / "dags"))


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    import os

    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {DAG_ID, "batch_predict", "sweep_image_classifier", "publish_dataset"} <= set(
        dagbag.dags
    )


def test_promotions_are_serialized_by_a_one_slot_pool(dagbag):
    assert dagbag.dags[DAG_ID].get_task("register").pool == "promotion"


def test_retries_back_off_time_out_and_alert(dagbag, webhook, monkeypatch):
    url, received = webhook
    monkeypatch.setenv("PIPELINE_ALERT_URLS", url.replace("http://", "json://"))
    for dag_id in (DAG_ID, "batch_predict", "sweep_image_classifier", "publish_dataset"):
        for t in dagbag.dags[dag_id].tasks:
            assert t.retries >= 1 and t.retry_exponential_backoff >= 2, t.task_id
            assert t.execution_timeout is not None, t.task_id
            callbacks = t.on_failure_callback
            for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
                ti = SimpleNamespace(dag_id=dag_id, task_id=t.task_id, try_number=1)
                callback({"ti": ti, "run_id": "manual__x", "exception": RuntimeError("boom")})
            assert received and received.pop()["title"].endswith(f".{t.task_id}")  # sent
    train = dagbag.dags[DAG_ID].get_task("train")
    assert train.pool == "gpu" and train.execution_timeout.total_seconds() == 6 * 3600
    trial = dagbag.dags["sweep_image_classifier"].get_task("trial")
    assert trial.executor_config == train.executor_config  # both get the GPU pod template
    assert Path(train.executor_config["pod_template_file"]).is_file()
    for dag_id in (DAG_ID, "batch_predict", "sweep_image_classifier", "publish_dataset"):
        for t in dagbag.dags[dag_id].tasks:
            assert t.max_retry_delay is not None, t.task_id  # backoff is bounded everywhere


def test_sweep_maps_one_trial_per_grid_point_in_the_gpu_pool(dagbag):
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    dag = dagbag.dags["sweep_image_classifier"]
    trial = dag.get_task("trial")
    assert trial.pool == "gpu" and "finish_sweep" in trial.downstream_task_ids
    assert isinstance(trial, MappedOperator)  # one task instance per grid point
    assert dag.get_task("finish_sweep").pool == "promotion"


def test_publishing_data_updates_the_asset_the_training_dag_waits_for(dagbag):
    publish = dagbag.dags["publish_dataset"].get_task("publish")
    (outlet,) = publish.outlets
    (watched,) = dagbag.dags[DAG_ID].timetable.asset_condition.objects
    assert outlet == watched


def test_batch_prediction_pins_the_model_before_scoring(dagbag):
    dag = dagbag.dags["batch_predict"]
    assert dag.schedule is None and set(dag.task_ids) == {"resolve_model", "score"}
    assert "score" in dag.get_task("resolve_model").downstream_task_ids
    assert dag.params["model"] == "image-classifier@champion"
    assert all(t.retries >= 1 for t in dag.tasks)


def test_data_is_checked_first_and_unchanged_work_is_skipped_before_training(dagbag):
    """The two tasks of the DAG that are not stages of the graph, and where they sit."""
    from pipeline.stages import graph

    dag = dagbag.dags[DAG_ID]
    assert set(dag.task_ids) == {
        "check_data",
        "skip_if_unchanged",
        "peer_nodes",
        "train_peer",
        *graph.BY_NAME,
    }
    for stage in graph.STAGES:
        assert "check_data" in _ancestors(dag, stage.name)
    assert _ancestors(dag, "skip_if_unchanged") == {"check_data", "validate"}
    assert "skip_if_unchanged" in _ancestors(dag, "train")


def test_schedule_retries_tags_and_trigger_form(dagbag):
    dag = dagbag.dags[DAG_ID]
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.timetable.timetable.expression == "0 0 * * 0"  # @weekly ...
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["pipeline-data"]
    # ... or when publish_dataset records a new data version
    assert {"ml", "training"} <= set(dag.tags)
    assert all(t.retries >= 1 for t in dag.tasks)
    params = dag.params
    assert {"dataset", "model", "optimizer", "lr", "schedule", "epochs", "batch_size"} <= set(
        params
    )
    # Empty fields: an untouched form neither overrides a preset nor hides params.yaml's value.
    assert params["optimizer"] is None and params["epochs"] is None
    assert "params.yaml's (12)" in params.get_param("epochs").description
    assert "rmsprop" in params.get_param("optimizer").schema["enum"]
    assert params["force_retrain"] is False  # a scheduled run skips unchanged work


def test_schedule_none_runs_on_new_data_and_triggers_only(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("PIPELINE_SCHEDULE", "none")
    dag = DagBag(dag_folder=str(REPO / "dags" / f"{DAG_ID}.py")).dags[DAG_ID]
    assert not hasattr(dag.timetable, "timetable")  # no time schedule left
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["pipeline-data"]


def test_trigger_form_choices_match_what_the_config_accepts(dagbag):
    from typing import get_args

    from airflow.sdk.exceptions import ParamValidationError

    from pipeline import config

    params = dagbag.dags[DAG_ID].params
    for name, literal in (
        ("dataset", config.DatasetName),
        ("model", config.ModelName),
        ("optimizer", config.OptimizerName),
        ("schedule", config.ScheduleName),
    ):
        # None: the empty field (params.yaml's value or the preset's)
        assert params.get_param(name).schema["enum"] == [None, *get_args(literal)], name
    presets = sorted(config.load_config(REPO / "params.yaml").presets)
    assert params.get_param("preset").schema["enum"] == [None, *presets]
    assert params["preset"] is None  # untouched form: plain params.yaml, like a scheduled run
    lr = params.get_param("lr")
    assert lr.resolve("auto") == "auto" and lr.resolve(0.01) == 0.01  # a number, or the test
    assert lr.schema["type"] == [
        "null",
        "number",
        "string",
    ]  # the form's free field (e2e: screenshot)
    for bad in (-1, "fast"):
        with pytest.raises(ParamValidationError):
            lr.resolve(bad)


def test_the_sweep_form_takes_preset_dataset_strategy_trials_epochs_and_val_fraction(dagbag):
    from airflow.sdk.exceptions import ParamValidationError

    from pipeline import choices

    params = dagbag.dags["sweep_image_classifier"].params
    # Empty by default: params.yaml's values, after the preset's, are what a sweep uses.
    for name in ("preset", "dataset", "strategy", "trials", "epochs", "val_fraction"):
        assert params[name] is None, name
    assert params.get_param("strategy").schema["enum"] == [None, *choices.SWEEP_STRATEGIES]
    assert "mnist" in params.get_param("dataset").schema["enum"]
    assert "lenet-mnist" in params.get_param("preset").schema["enum"]
    fraction = params.get_param("val_fraction")
    assert fraction.resolve(0.1) == 0.1
    for bad in (0, 1, -0.5):
        with pytest.raises(ParamValidationError):
            fraction.resolve(bad)
    with pytest.raises(ParamValidationError):
        params.get_param("trials").resolve(0)


@pytest.mark.parametrize(
    "dag_file",
    [
        "train_image_classifier.py",
        "batch_predict.py",
        "sweep_image_classifier.py",
        "publish_dataset.py",
    ],
)
def test_parsing_the_dag_imports_no_heavy_library(dag_file):
    code = f"""
import json, sys, runpy
sys.path.insert(0, {str(REPO / "dags")!r})  # as Airflow does for the DAG folder
runpy.run_path({str(REPO / "dags" / dag_file)!r})
heavy = [m for m in ("torch", "mlflow", "great_expectations", "dvc", "sklearn")
         if m in sys.modules]
print(json.dumps([heavy, sorted(m for m in sys.modules if m.split(".")[0] == "pipeline")]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, ours = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == []
    assert ours in ([], ["pipeline", "pipeline.choices"])  # names only: no config, no stages


def _ancestors(dag, task_id: str) -> set[str]:
    found, todo = set(), [task_id]
    while todo:
        for up in dag.get_task(todo.pop()).upstream_task_ids:
            if up not in found:
                found.add(up)
                todo.append(up)
    return found


def test_the_training_dag_wires_exactly_the_stage_graph(dagbag):
    """Each stage of pipeline/stages/graph.py is a task, after exactly the stages it needs or
    runs after."""
    from pipeline.stages import graph

    dag = dagbag.dags[DAG_ID]
    names = {stage.name for stage in graph.STAGES}
    missing = names - set(dag.task_ids)
    assert missing == set(), f"add a task for each of these stages to {DAG_ID}"

    def needs(name: str) -> set[str]:
        direct = set(graph.BY_NAME[name].needs) | set(graph.BY_NAME[name].after)
        return direct.union(*(needs(n) for n in direct))

    for stage in graph.STAGES:
        assert _ancestors(dag, stage.name) & names == needs(stage.name), stage.name
        task = dag.get_task(stage.name)
        given = {
            op.task_id
            for arg in [*task.op_args, *task.op_kwargs.values()]
            for op, _ in arg.iter_references()
        }
        missing = set(stage.needs) - given
        assert missing == set(), f"pass the output of {missing} to the {stage.name} task"
