"""Edges users reach through the CLI: many classes with names MLflow refuses in metric names."""

import csv
import json

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline.training.scoring import class_key
from tests.conftest import run

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
