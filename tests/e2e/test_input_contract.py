"""One input contract from the photo folder to the served prediction: `pipeline predict` and the
MLflow model (`mlflow models serve` sent the photo files, `mlflow.pyfunc.load_model`) give the
classes the evaluated model gives the ingested test split, under every resize policy and for
16-bit images; both refuse the same bad values with the same message; a version saved before
contracts still predicts as it did."""

import base64
import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from tests.conftest import run
from tests.e2e.live import ServedModel

pytestmark = [pytest.mark.slow, pytest.mark.long]
NAME = "image-classifier"


def _stripes(root, bits: int) -> None:
    """64 x 32 photos of vertical stripes, 4 px wide ("wide") or 2 px ("narrow"), random phase,
    a little noise; ImageNet layout, so val/ is exactly data/'s test split, in file order."""
    rng = np.random.default_rng(bits)
    for split, n in (("train", 50), ("val", 25)):
        for cls, period in (("narrow", 4), ("wide", 8)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                on = (np.arange(64) + rng.integers(period)) % period < period // 2
                pixels = np.tile(np.where(on, 200, 40), (32, 1)) + rng.integers(-10, 11, (32, 64))
                if bits == 16:  # a 12-bit camera's values in 16-bit PNGs
                    Image.fromarray((pixels * 16).astype(np.uint16)).save(
                        root / split / cls / f"{i:02d}.png"
                    )
                else:
                    Image.fromarray(pixels.astype(np.uint8)).convert("RGB").save(
                        root / split / cls / f"{i:02d}.jpg", quality=95
                    )


def _predict(project, source, model=NAME, output="pred.csv") -> list[str]:
    args = ["--model", model, "--input", str(source), "--output", str(project / output)]
    run(["pipeline", "predict", *args], project)
    return [line.split(",")[1] for line in (project / output).read_text().splitlines()[1:]]


def _refusal(project, array, model) -> str:
    np.save(project / "bad.npy", array)
    args = ["--model", model, "--input", str(project / "bad.npy"), "--output", "x.csv"]
    result = run(["pipeline", "predict", *args], project, check=False)
    assert result.returncode == 1 and not (project / "x.csv").exists()
    return result.stderr.strip().removeprefix(f"data error: {project / 'bad.npy'} ")


@pytest.mark.parametrize("resize, bits", [("crop", 16), ("squash", 8), ("pad", 8)])
def test_predict_and_the_mlflow_model_score_files_as_evaluate_did(
    from_template, tmp_path, resize, bits
):
    project = from_template("pulled")
    mlflow.set_tracking_uri(f"sqlite:///{project}/.mlflow/mlflow.db")
    source = tmp_path / "stripes"
    _stripes(source, bits)
    data = ["--set", "base.dataset=imagefolder", "--set", f"data.source_dir={source}"]
    data += ["--set", "data.image_size=32", "--set", f"data.resize={resize}"]
    run(["pipeline", "data", "pull", *data], project)
    run(["pipeline", "validate", *data], project)
    trained = json.loads(
        run(
            ["pipeline", "train", *data, "--set", "train.epochs=8", "--set", "train.batch_size=16"],
            project,
        ).stdout
    )
    run(["pipeline", "evaluate", *data], project)
    run(["pipeline", "register", *data, "--set", "register.floor=0"], project)
    accuracy = json.loads((project / "reports" / "metrics.json").read_text())["test_accuracy"]
    assert accuracy == 1.0  # the stripes are learnable under each policy
    # So the classes evaluate gave data/'s test split are its labels, row by row; and val/ is
    # that split, in the same order.
    labels = np.load(project / "data" / "test_labels.npy")
    evaluated = [["narrow", "wide"][k] for k in labels]
    files = sorted((source / "val").rglob("*.*"))
    assert _predict(project, source / "val") == evaluated  # the photos, as ingest saw them

    version = MlflowClient().get_model_version_by_alias(NAME, "champion")
    contract = json.loads(version.tags["input.contract"])
    assert (contract["resize"], contract["bit_depth"]) == (resize, 12 if bits == 16 else 8)
    assert json.loads(version.tags["classes"]) == ["narrow", "wide"]
    assert f"resized by `{resize}`" in version.description

    encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
    pixels = np.load(project / "data" / "test_images.npy")
    with ServedModel(project, f"models:/{NAME}@champion") as served:  # as a client sends it
        status, answer = served.invocations(encoded)
        assert status == 200
        assert [row["prediction"] for row in answer["predictions"]] == evaluated
        assert all(
            abs(sum(v for k, v in row.items() if k.startswith("p_")) - 1) < 1e-5
            for row in answer["predictions"]
        )
        status, answer = served.invocations(pixels[:5].tolist())  # uint8 as JSON numbers
        assert [row["prediction"] for row in answer["predictions"]] == evaluated[:5]
        if resize == "crop":  # the refusals do not depend on the policy: checked once
            for bad in (pixels[:3] / 255.0, np.where(pixels[:3] > 100, np.nan, pixels[:3])):
                said = _refusal(project, bad, NAME)
                status, answer = served.invocations(bad.tolist())
                assert status == 400 and f"the input {said}" in answer["message"]

    if resize == "squash":  # the same model in Python: uint8 as in data/, 0..255 floats, bytes
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        assert model.predict(pixels).prediction.tolist() == evaluated
        assert model.predict(pixels.astype(np.float32)).prediction.tolist() == evaluated
        as_bytes = np.array([f.read_bytes() for f in files], dtype=object)
        assert model.predict(as_bytes).prediction.tolist() == evaluated
        with pytest.raises(mlflow.exceptions.MlflowException, match="the input looks scaled"):
            model.predict(pixels[:3] / 255.0)

    if resize == "pad":
        _legacy_version_predicts_as_it_did(project, trained["run_id"], files, tmp_path)


def _legacy_version_predicts_as_it_did(project, run_id, files, tmp_path):
    """A version whose weights carry no contract (saved before it existed) is squashed to size,
    as `pipeline predict` did then."""
    client = MlflowClient()
    saved = torch.load(
        client.download_artifacts(run_id, "weights/model.pt", str(tmp_path)), weights_only=True
    )
    del saved["spec"]["contract"]
    (tmp_path / "old").mkdir()
    torch.save(saved, tmp_path / "old" / "model.pt")
    experiment = client.get_run(run_id).info.experiment_id
    with mlflow.start_run(experiment_id=experiment) as old:
        mlflow.log_artifact(str(tmp_path / "old" / "model.pt"), "weights")
    source = client.get_run(run_id).data.tags["model_uri"]
    version = client.create_model_version(NAME, source, run_id=old.info.run_id)
    squashed = np.stack(
        [
            np.asarray(Image.open(f).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
            for f in files
        ]
    ).transpose(0, 3, 1, 2)
    np.save(tmp_path / "squashed.npy", squashed)
    old_model = f"{NAME}/{version.version}"
    expected = _predict(project, tmp_path / "squashed.npy", old_model, "legacy-npy.csv")
    assert _predict(project, files[0].parent.parent, old_model, "legacy.csv") == expected
