"""Edges users reach through the CLI: many classes with names MLflow refuses in metric names."""

import csv
import json
import signal
import subprocess

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from pipeline.training.scoring import class_key
from tests.conftest import fill_disk, fresh_clone, project_env, run

pytestmark = pytest.mark.slow
# Folder names are free; MLflow metric names are not (brackets, quotes, colons, '#', '?', ...).
ODD = ["dog's toy", "a[1]", "naïve:1", "50% off?", "#tag", "x" * 230, "a-x0123456789"]


def _classes_folder(root, names: list[str], per_class: int = 5) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        base = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        for i in range(per_class):
            noise = rng.integers(-20, 21, (8, 8))
            pixels = np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_a_thousand_classes_with_odd_names_train_evaluate_and_register(project, tmp_path):
    names = ODD + [f"class {k:04d}" for k in range(1000 - len(ODD))]
    _classes_folder(tmp_path / "photos", names)
    s = ["--set", "base.dataset=imagefolder"]
    run(["pipeline", "data", "pull", "--dataset", "imagefolder", "--source-dir",
         str(tmp_path / "photos")], project)  # fmt: skip
    run(["pipeline", "validate", *s], project)
    run(["pipeline", "train", *s, "--set", "train.model.name=lenet", "--set", "train.epochs=1"],
        project)  # fmt: skip
    evaluated = run(["pipeline", "evaluate", *s], project, timeout=300)  # minutes before
    run_id = json.loads(evaluated.stdout)["run_id"]
    run(["pipeline", "register", *s, "--set", "register.floor=0"], project)

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")
    found = client.get_run(run_id)
    assert found.info.status == "FINISHED"
    metrics = found.data.metrics
    keys = {class_key(n) for n in names}
    assert len(keys) == 1000  # no two classes share a key
    assert {f"test_recall.{k}" for k in keys} <= set(metrics)
    assert "test_recall.dog_s toy-x" + class_key("dog's toy")[-10:] in metrics
    assert "test_recall.class 0007" in metrics  # a name MLflow takes is kept as it is
    # What people read says the names as written.
    with open(project / "reports" / "plots" / "per_class.csv", newline="") as handle:
        assert [row[0] for row in csv.reader(handle)][1:] == sorted(names)
    (version,) = client.search_model_versions("name='image-classifier'")
    assert len(version.description) < 5000  # PostgreSQL's column holds 5,000 characters
    card = client.download_artifacts(run_id, "model_card.md", str(tmp_path))
    text = open(card).read()
    assert "| dog's toy |" in text and "| naïve:1 |" in text
    # The confusion matrix stays a picture one can read, not one cell per pair of classes.
    with Image.open(project / "outputs" / "plots" / "confusion_matrix.png") as png:
        assert max(png.size) <= 2000


def _one_line(result) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_a_full_checkpoint_disk_is_one_line_and_resume_works_once_space_is_freed(
    from_template, small_disk
):
    project = from_template("validated")
    env = {**project_env(project), "PIPELINE_CHECKPOINT_DIR": str(small_disk)}
    train = ["pipeline", "train", "--set", "train.epochs=4"]
    proc = subprocess.Popen(train, cwd=project, env=env, stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL)  # fmt: skip
    for line in proc.stderr:
        if line.startswith("epoch   1/"):  # its checkpoint is on disk: now the disk fills up
            proc.send_signal(signal.SIGSTOP)
            filler = fill_disk(small_disk)
            proc.send_signal(signal.SIGCONT)
            break
    result = subprocess.CompletedProcess(train, proc.wait(timeout=300), "", proc.stderr.read())
    line = _one_line(result)
    assert line.startswith("error: disk full writing ") and str(small_disk) in line
    (checkpoint,) = small_disk.glob("*.pt")
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1  # the last whole one, kept
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")
    (failed,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert failed.info.status == "FAILED"  # not left RUNNING

    filler.unlink()  # space freed
    resumed = run([*train, "--resume"], project, env={"PIPELINE_CHECKPOINT_DIR": str(small_disk)})
    assert json.loads(resumed.stdout)["run_id"] == failed.info.run_id  # the same run, continued
    assert client.get_run(failed.info.run_id).info.status == "FINISHED"


def test_a_full_disk_under_the_mlflow_store_is_one_line_not_a_broken_store(
    from_template, small_disk
):
    project = from_template("validated")
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{small_disk}/mlflow.db"}
    run(["pipeline", "train", "--set", "train.epochs=1"], project, env=store)
    filler = fill_disk(small_disk)
    for stage in (["train", "--set", "train.epochs=1"], ["evaluate"]):
        line = _one_line(run(["pipeline", *stage], project, check=False, env=store))
        assert line.startswith("error: disk full") and str(small_disk) in line, line
        assert "backup" not in line  # the store is whole: nothing to restore
    filler.unlink()
    run(["pipeline", "evaluate"], project, env=store)  # space freed: the same store works


def test_a_project_path_with_spaces_and_accents_reproduces_a_model(tmp_path):
    (tmp_path / "équipe ML").mkdir()
    project = fresh_clone(tmp_path / "équipe ML" / "mon projet")
    for command in (
        ["data", "pull"],
        ["validate"],
        ["train", "--set", "train.epochs=1"],
        ["evaluate"],
        ["register", "--set", "register.floor=0"],
    ):
        run(["pipeline", *command], project)
    # Same data, config and seed on the same machine: the same model again (exit 0).
    reproduced = run(["pipeline", "reproduce", "image-classifier/1"], project)
    assert "\nREPRODUCED (tolerance 0)" in reproduced.stdout


def test_evaluate_refuses_data_the_run_was_not_trained_on_and_logs_nothing(from_template, tmp_path):
    project = from_template("trained")  # digits: 10 classes "0".."9" of 1x8x8
    run_id = json.loads((project / "outputs" / "train.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")
    before = client.get_run(run_id).data.metrics
    # Another data version with the same classes and image shape: only its md5 tells them apart.
    _classes_folder(tmp_path / "photos", [str(k) for k in range(10)], per_class=30)
    run(["pipeline", "data", "pull", "--dataset", "imagefolder", "--source-dir",
         str(tmp_path / "photos")], project)  # fmt: skip
    refused = run(["pipeline", "evaluate", "--set", "base.dataset=imagefolder"], project,
                  check=False)  # fmt: skip
    line = _one_line(refused)
    assert f"run {run_id} cannot be evaluated on data/ (trained on data version" in line
    assert client.get_run(run_id).data.metrics == before  # nothing logged into the run


def test_torchrun_with_lr_auto_is_refused_before_it_starts(project):
    refused = run(["pipeline", "train", "--nproc", "2", "--set", "train.optimizer.lr=auto"],
                  project, check=False)  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "train.optimizer.lr=auto is not run under torchrun" in line


def test_commands_started_together_on_a_new_project_share_one_store(project):
    run(["pipeline", "data", "pull"], project)  # no MLflow store yet: the first command makes it
    procs = [
        subprocess.Popen(["pipeline", "validate"], cwd=project, env=project_env(project),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")
    names = [e.name for e in client.search_experiments()]
    assert names.count("image-classifier") == 1
