"""Differentially private training as a user runs it on digits: epsilon per epoch, a killed run
resumed to the same epsilon, the guarantee on the version, and the epsilon gate refusing a model
above the bound and one distilled from the private model (it has no epsilon of its own)."""

import json

import pytest
from mlflow import MlflowClient

from tests.conftest import run
from tests.e2e.live import kill_after_epoch

pytestmark = pytest.mark.slow
NAME = "image-classifier"
PRIVATE = [
    "train.model.name=mlp",
    "train.optimizer.name=adamw",
    "train.optimizer.lr=0.01",
    "train.schedule.name=constant",
    "train.schedule.warmup_epochs=0",
    "train.epochs=6",
    "train.privacy.enabled=true",
    "train.privacy.noise_multiplier=1.0",
    "register.floor=0.5",
]
SETS = [a for s in PRIVATE for a in ("--set", s)]


def test_a_private_run_resumes_to_the_same_epsilon_and_the_gate_reads_it(from_template, tmp_path):
    project = from_template("validated")
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")
    trained = run(["pipeline", "train", *SETS], project)
    whole = json.loads(trained.stdout)["run_id"]
    assert "train_loss" in trained.stderr and " epsilon " in trained.stderr  # spent so far
    kill_after_epoch(project, ["pipeline", "train", *SETS], 3)
    resumed = run(["pipeline", "train", "--resume", *SETS], project)
    assert "resuming MLflow run" in resumed.stderr and "epoch   1/6" not in resumed.stderr
    again = json.loads(resumed.stdout)["run_id"]
    a, b = client.get_run(whole), client.get_run(again)
    assert a.data.params["privacy.epsilon"] == b.data.params["privacy.epsilon"]
    assert b.data.tags["privacy.epsilon"] == b.data.params["privacy.epsilon"]
    assert float(b.data.params["privacy.delta"]) == 1e-5  # min(1e-5, 1/(10 N))
    history = client.get_metric_history(again, "epsilon")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # each epoch once
    spent = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert spent == sorted(spent) and spent[-1] == pytest.approx(
        float(b.data.params["privacy.epsilon"])
    )
    epsilon = spent[-1]

    # the gate: within the bound it registers as champion, with its guarantee on the version
    run(["pipeline", "evaluate", "--run-id", again, *SETS], project)
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["privacy.epsilon"] == pytest.approx(epsilon)  # dvc exp show's column
    bound = ["--set", f"register.max_epsilon={epsilon + 1}"]
    out = json.loads(
        run(["pipeline", "register", "--run-id", again, *SETS, *bound], project).stdout
    )
    assert (out["promoted"], out["rule"]) == (True, "first_model") and out["challenger"] > 0.5
    version = client.get_model_version(NAME, str(out["version"]))
    assert float(version.tags["privacy.epsilon"]) == pytest.approx(epsilon)
    explained = json.loads(
        run(["pipeline", "explain", "--model", f"{NAME}@champion"], project).stdout
    )
    assert explained["run_id"] == again and explained["skipped"] == {}  # a private model explains
    status = run(["pipeline", "status"], project).stdout
    assert f"(DP-SGD epsilon {epsilon:.3g})" in status  # what on-call sees
    card = open(client.download_artifacts(again, "model_card.md", str(tmp_path))).read()
    assert f"epsilon {epsilon:.3g} at delta 1e-05" in card and "## Explanations" in card
    report = open(client.download_artifacts(again, "promotion/decision.md", str(tmp_path))).read()
    assert f"- privacy: epsilon {epsilon:.3g} at delta 1e-05 (DP-SGD)" in report

    # above the bound: refused, naming it
    run(["pipeline", "evaluate", "--run-id", whole, *SETS], project)
    tight = ["--set", f"register.max_epsilon={epsilon / 2}"]
    out = json.loads(
        run(["pipeline", "register", "--run-id", whole, *SETS, *tight], project).stdout
    )
    assert (out["promoted"], out["rule"]) == (False, "privacy")
    assert f"epsilon {epsilon:.3g} (delta 1e-05) is above register.max_epsilon" in out["reason"]

    # distilled from the private champion: no epsilon of its own, and the gate says so
    distill = ["--set", "compress.methods=[distill]", "--set", "compress.distill.epochs=2"]
    distill += ["--set", "compress.distill.student.name=mlp"]
    distill += ["--set", "compress.distill.student.hidden=16", "--set", "compress.latency_runs=20"]
    distill += ["--set", f"compress.teacher={NAME}@champion"]
    made = json.loads(run(["pipeline", "compress", *distill, *SETS, *bound], project).stdout)
    (result,) = made["results"]
    student = client.get_run(result["run_id"])
    assert "privacy.epsilon" not in student.data.params  # trained without DP-SGD
    assert "no epsilon of its own" in student.data.tags["privacy.note"]
    registered = result["registered"]
    assert (registered["promoted"], registered["rule"]) == (False, "privacy")
    assert "no epsilon: made by distill from a private teacher" in registered["reason"]


def test_settings_without_a_guarantee_are_refused_before_a_run_opens(from_template):
    project = from_template("validated")
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    before = len(client.search_runs(experiments))
    for extra, said in (
        (["--set", "train.batch_size=5000"], "train.batch_size 5000 is larger than the"),
        (["--set", "train.privacy.delta=0.01"], "train.privacy.delta 0.01 is not below 1/N"),
        (["--nproc", "2"], "train.privacy runs in one process"),
    ):
        refused = run(["pipeline", "train", *SETS, *extra], project, check=False)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert len(client.search_runs(experiments)) == before  # no FAILED or KILLED run left behind
