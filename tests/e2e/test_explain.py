"""`pipeline explain` as a user runs it: on a model registered before it was explained, with
every attribution method, its card rewritten; and the refusals of bad settings and references.
(The DAG and dvc.yaml explain each new model before register: test_pipeline_runs; each
compressed kind, int8 included: test_compress.)"""

import json

import pytest
from mlflow import MlflowClient

from tests.conftest import run

pytestmark = pytest.mark.slow
NAME = "image-classifier"
ALL = "[integrated_gradients,saliency,occlusion,kernel_shap,lime]"


def _card(client: MlflowClient, run_id: str, folder) -> str:
    return open(client.download_artifacts(run_id, "model_card.md", str(folder))).read()


def test_explain_a_registered_model_with_every_method_rewrites_its_card(from_template, tmp_path):
    project = from_template("registered")  # v1, registered before anything explained it
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")
    run_id = client.get_model_version(NAME, "1").run_id
    assert "- none yet: `pipeline explain --model NAME/VERSION`" in _card(client, run_id, tmp_path)

    sets = ["--set", f"explain.methods={ALL}", "--set", "explain.samples=40"]
    sets += ["--set", "explain.max_images=13", "--set", "explain.mistakes=3"]
    out = run(["pipeline", "explain", "--model", f"{NAME}@champion", *sets], project)
    result = json.loads(out.stdout)
    assert result == json.loads((project / "outputs" / "explained.json").read_text())
    assert result["run_id"] == run_id and result["images"] == 13 and result["skipped"] == {}
    assert result["methods"] == ALL.strip("[]").split(",")
    assert "explain: lime 13/13 images" in out.stderr  # a progress line per chunk

    files = {a.path for a in client.list_artifacts(run_id, "explain")}
    for method in result["methods"]:
        assert f"explain/{method}_samples.png" in files
        assert client.get_run(run_id).data.metrics[f"explain_ms_per_image.{method}"] > 0
    summary = json.loads(open(client.download_artifacts(run_id, "explain/summary.json")).read())
    assert summary["images"] == 13 and summary["data_md5"]
    mistakes = summary["mistakes"]  # at most 3: the 2-epoch model may make fewer
    assert 0 <= mistakes <= 3 and ("explain/lime_mistakes.png" in files) == (mistakes > 0)
    card = _card(client, run_id, tmp_path / "after")
    assert "none yet" not in card and "13 test images (2 per class, seeded" in card
    assert "`kernel_shap` (" in card and "## Results on the test split" in card

    again = json.loads(run(["pipeline", "explain", "--run-id", run_id, *sets], project).stdout)
    assert again["images"] == 13  # same seed, same sample, logged over the first
    only = ["--set", "explain.methods=[saliency]"]
    run(["pipeline", "explain", "--run-id", run_id, *only], project)
    files = {a.path for a in client.list_artifacts(run_id, "explain")}
    assert "explain/saliency_samples.png" in files  # the last explain's files, and no other
    assert not any(f.startswith("explain/lime") for f in files)


def test_bad_settings_and_unknown_models_are_refused_naming_them(from_template):
    project = from_template("trained")
    for bad, said in (
        ("explain.methods=[gradcam]", "explain.methods"),
        ("explain.max_images=0", "explain.max_images"),
        ("explain.methods=[lime,lime]", "lists a method twice"),
    ):
        refused = run(["pipeline", "explain", "--set", bad], project, check=False)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
    missing = run(["pipeline", "explain", "--model", f"{NAME}/9"], project, check=False)
    assert missing.returncode == 1 and NAME in missing.stderr
    assert not (project / "outputs" / "explained.json").exists()
    for bad, said in (
        (["--set", "explain.patch=8"], "explain.patch 8 is not smaller than the images' side"),
        (["--set", "explain.per_class=0", "--set", "explain.mistakes=0"], "no test image"),
        (["--model", f"{NAME}/1", "--run-id", "abc"], "not allowed with argument"),
    ):
        refused = run(["pipeline", "explain", *bad], project, check=False)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")
    experiment = client.search_experiments()[0].experiment_id
    failed = client.create_run(experiment).info.run_id
    client.set_terminated(failed, "FAILED")  # a training run that crashed: no weights
    refused = run(["pipeline", "explain", "--run-id", failed], project, check=False)
    assert refused.returncode == 1 and f"run {failed} is FAILED, not FINISHED" in refused.stderr
    off = run(["pipeline", "explain", "--set", "explain.methods=[]"], project)
    assert json.loads(off.stdout)["methods"] == [] and "nothing to do" in off.stderr
