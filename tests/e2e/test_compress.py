"""`pipeline compress` as a user runs it on digits: a distilled student, a pruned network and an
int8 ONNX model, each its own run linked to the teacher, explained, registered, and served by
`pipeline predict`, `mlflow.pyfunc` and `mlflow models serve`; a killed distillation resumes."""

import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import run
from tests.e2e.live import ServedModel, kill_after_epoch

pytestmark = pytest.mark.slow
NAME = "image-classifier"
ALL = [
    "--set", "compress.methods=[distill,prune,quantize]",
    "--set", "compress.distill.epochs=6",
    "--set", "compress.distill.student.name=mlp",
    "--set", "compress.distill.student.hidden=16",
    "--set", "compress.prune.epochs=2",
    "--set", "compress.latency_runs=20",
    "--set", "register.floor=0",
]  # fmt: skip


@pytest.fixture
def registered(from_template):
    project = from_template("registered")
    mlflow.set_tracking_uri(f"sqlite:///{project}/.mlflow/mlflow.db")
    return project


def _weights(client, run_id: str, folder) -> dict:
    path = client.download_artifacts(run_id, "weights/model.pt", str(folder))
    return torch.load(path, weights_only=True)


def _predict(run_id: str, images: np.ndarray) -> np.ndarray:
    from pipeline.tracking import weights
    from pipeline.training import inference

    model, _ = weights.load_weights(run_id)
    return inference.predict(model, images)


def test_compress_makes_smaller_challengers_linked_to_their_teacher_that_serve(
    registered, tmp_path
):
    project = registered
    teacher = json.loads((project / "outputs" / "train.json").read_text())["run_id"]
    client = MlflowClient()
    # what a later method would refuse is refused before the first one makes anything
    for bad, said in (
        ("compress.prune.max_params=10", "over the budget (max_params 10, max_macs null)"),
        ("compress.distill.student.name=resnet18", "compress.distill.student (resnet18, hidden"),
    ):
        sets = ["--set", "compress.methods=[quantize,distill,prune]", "--set", bad]
        refused = run(["pipeline", "compress", *sets], project, check=False)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1
    assert not client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`compress.method` != ''"
    )
    out = run(["pipeline", "compress", *ALL], project)
    result = json.loads(out.stdout)
    assert result["teacher"] == {"run_id": teacher, "model": f"{NAME}/1"}
    assert result == json.loads((project / "outputs" / "compressed.json").read_text())
    made = {r["method"]: r for r in result["results"]}
    assert list(made) == ["distill", "prune", "quantize"]
    images = np.load(project / "data" / "test_images.npy")
    labels = np.load(project / "data" / "test_labels.npy")
    teacher_file = _weights(client, teacher, tmp_path / "teacher")
    teacher_elements = sum(t.numel() for t in teacher_file["state_dict"].values())

    for method, r in made.items():
        got = client.get_run(r["run_id"])
        assert got.info.status == "FINISHED"
        tags = got.data.tags
        assert tags["compress.method"] == method and tags["compress.teacher_run_id"] == teacher
        assert tags["compress.teacher_model"] == f"{NAME}/1" and tags["data.md5"]
        metrics = got.data.metrics
        for key in ("params", "model_bytes", "macs", "latency_p50_ms", "throughput"):
            assert metrics[key] > 0 and metrics[f"teacher_{key}"] > 0, key
        assert metrics["test_accuracy"] == r["test_accuracy"] and "test_recall.0" in metrics
        assert r["model_bytes"] < r["teacher_model_bytes"], method
        version = r["registered"]["version"]
        assert client.get_model_version(NAME, str(version)).run_id == r["run_id"]
        card = client.download_artifacts(r["run_id"], "model_card.md", str(tmp_path / method))
        text = open(card).read()
        assert f"made by `{method}`" in text and f"from {NAME}/1" in text
        assert (
            f"pipeline compress --set 'compress.methods=[{method}]' --set 'compress.teacher" in text
        )
        # explained before it was registered; int8 has no gradients, so occlusion alone
        explained = client.download_artifacts(r["run_id"], "explain/summary.json", str(tmp_path))
        summary = json.loads(open(explained).read())
        if method == "quantize":
            assert summary["methods"] == ["occlusion"]
            assert "needs gradients" in summary["skipped"]["integrated_gradients"]
            assert "`integrated_gradients` not run: needs gradients" in text
        else:
            assert summary["methods"] == ["integrated_gradients", "occlusion"], method
        assert "## Explanations" in text and "explain/class_means.png" in summary["files"]

    status = run(["pipeline", "status"], project).stdout
    for method in made:  # what each version is
        assert f"({method} of {NAME}/1)" in status

    refused = run(["pipeline", "reproduce", f"{NAME}/{made['distill']['registered']['version']}"],
                  project, check=False)  # fmt: skip
    assert refused.returncode == 1 and "made by `pipeline compress` (distill of" in refused.stderr

    # distill: a student with fewer parameters, trained on the teacher's outputs
    assert made["distill"]["params"] < made["distill"]["teacher_params"] / 4
    history = client.get_metric_history(made["distill"]["run_id"], "train_loss")
    assert len(history) == 6 and made["distill"]["test_accuracy"] > 0.6  # chance: 0.1
    # prune: channels removed from the saved weights, not zeroed
    pruned = _weights(client, made["prune"]["run_id"], tmp_path / "pruned")
    assert pruned["spec"]["layers"]  # every changed width, so rebuild() makes it
    assert sum(t.numel() for t in pruned["state_dict"].values()) < teacher_elements * 0.4
    assert made["prune"]["params"] < made["prune"]["teacher_params"] * 0.4
    assert all(key.startswith("1.") or key.startswith("0.") for key in pruned["state_dict"])
    # quantize: an ONNX artifact a quarter of the size that agrees with the float teacher
    q = made["quantize"]
    listed = {a.path for a in client.list_artifacts(q["run_id"], "weights")}
    assert "weights/model.onnx" in listed and "weights/model.pt" not in listed
    assert q["model_bytes"] < q["teacher_model_bytes"] / 2.5
    assert q["params"] == q["teacher_params"] and q["macs"] == q["teacher_macs"]
    assert q["float_onnx_latency_p50_ms"] > 0
    int8, float_ = _predict(q["run_id"], images), _predict(teacher, images)
    assert (int8 == float_).mean() >= 0.99
    assert abs((int8 == labels).mean() - q["test_accuracy"]) < 1e-9

    # the efficiency option: the tiny student takes champion only when allowed to trade accuracy
    d = made["distill"]["registered"]["version"]
    promote = ["pipeline", "promote", f"{NAME}/{d}", "--set", "register.floor=0"]
    strict = ["--set", "register.max_accuracy_drop=0.0", "--set", "register.min_size_ratio=1e6"]
    refused = json.loads(run([*promote, *strict], project).stdout)
    assert (refused["promoted"], refused["rule"]) == (False, "improvement")
    assert (
        "efficiency: test_accuracy drop" in refused["reason"]
        and "size needed 1e+06x" in (refused["reason"])
    )
    loose = ["--set", "register.max_accuracy_drop=1.0", "--set", "register.min_size_ratio=2"]
    taken = json.loads(run([*promote, *loose], project).stdout)
    assert (taken["promoted"], taken["rule"]) == (True, "efficiency"), taken["reason"]
    assert taken["challenger_params"] == made["distill"]["params"]
    report = client.download_artifacts(made["distill"]["run_id"], "promotion/decision.md")
    text = open(report).read()
    assert "rule: `efficiency`" in text and "| parameters | file bytes | MACs per image |" in text

    # the int8 model as champion: pipeline predict, the MLflow model, mlflow models serve
    v = q["registered"]["version"]
    run(["pipeline", "promote", f"{NAME}/{v}", "--force", "--reason", "int8 test"], project)
    np.save(project / "x.npy", images[:40])
    args = ["--model", NAME, "--input", "x.npy", "--output", "p.csv"]
    run(["pipeline", "predict", *args], project)
    rows = (project / "p.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == [str(k) for k in int8[:40]]
    assert all(r.endswith(f"{NAME}/{v}") for r in rows)
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert served.predict(images[:40]).prediction.astype(int).tolist() == int8[:40].tolist()
    from pipeline.tracking.weights import png_base64

    with ServedModel(project, f"models:/{NAME}@champion") as server:
        status, answer = server.invocations([png_base64(i) for i in images[:10]])
        assert status == 200
        assert [int(a["prediction"]) for a in answer["predictions"]] == int8[:10].tolist()
        status, answer = server.invocations((images[:2] / 255.0).tolist())
        assert status == 400 and "looks scaled to 0..1" in answer["message"]


def test_a_killed_distillation_resumes_into_its_run_and_a_retry_makes_nothing_twice(registered):
    project = registered
    sets = ["--set", "compress.methods=[distill]", "--set", "compress.distill.epochs=25"]
    sets += ["--set", "register.floor=0", "--set", "compress.latency_runs=20"]
    kill_after_epoch(project, ["pipeline", "compress", *sets], 3)
    checkpoints = list((project / "outputs" / "checkpoints").glob("*.pt"))
    assert len(checkpoints) == 1

    resumed = run(["pipeline", "compress", "--resume", *sets], project)
    assert "resuming MLflow run" in resumed.stderr and "epoch   1/25" not in resumed.stderr
    client = MlflowClient()
    (distilled,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`compress.method` = 'distill'"
    )
    assert distilled.info.status == "FINISHED" and "train.interrupted" not in distilled.data.tags
    steps = sorted(m.step for m in client.get_metric_history(distilled.info.run_id, "train_loss"))
    assert steps == list(range(1, 26))  # every epoch once
    assert not list((project / "outputs" / "checkpoints").glob("*.pt"))
    version = json.loads(resumed.stdout)["results"][0]["registered"]["version"]

    again = run(["pipeline", "compress", "--resume", *sets], project)  # a retried task
    assert "finished already" in again.stderr and "epoch" not in again.stderr
    assert json.loads(again.stdout)["results"][0]["registered"]["version"] == version
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2  # the teacher and it
