"""The MLflow UI as a user opens it, in headless Chromium on a registered project: the link the
pipeline prints lands on the training runs with their scores, a run's charts start with the
scores, and the registered model and its version explain themselves. Screenshots land in
outputs/screenshots/ (docs/images/ keeps copies)."""

import pytest
from mlflow import MlflowClient

from tests.e2e.browser import SCREENSHOTS, chromium
from tests.e2e.live import MlflowServer

pytestmark = pytest.mark.slow
MODEL = "image-classifier"


@pytest.fixture
def mlflow_ui(from_template):
    """(UI address, client, project) for a project with a trained, registered champion."""
    project = from_template("registered")
    uri = f"sqlite:///{project}/.mlflow/mlflow.db"
    with MlflowServer(project, uri) as server:
        yield server.url, MlflowClient(tracking_uri=uri), project


def _close_assistant(page) -> None:
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()  # MLflow's assistant panel would hide half the page


def test_the_mlflow_pages_open_on_what_matters(mlflow_ui, tmp_path):
    from pipeline.tracking.store import ui_path

    ui, client, project = mlflow_ui
    experiment = client.get_experiment_by_name(MODEL)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (trained,) = client.search_runs([experiment.experiment_id])
    metrics = set(trained.data.metrics)
    assert {"system/epoch_seconds", "system/samples_per_second", "train_lr"} <= metrics
    assert not any(m.startswith("validation.") for m in metrics)  # counts are tags
    assert trained.data.tags["validation.evaluated"].isdigit()
    run_name = trained.info.run_name

    with chromium(tmp_path / "chromium-profile") as page:
        page.goto(f"{ui}{ui_path(experiment.experiment_id)}")
        page.get_by_text(run_name).first.wait_for()
        _close_assistant(page)
        table = page.locator("[role=grid], table").first.inner_text()  # the columns in view
        assert "/runs" in page.url
        assert {"test_accuracy", "test_macro_f1", "val_accuracy", "train.batch_size"} <= set(
            table.split("\n")
        )
        page.screenshot(path=SCREENSHOTS / "mlflow-runs.png")

        page.goto(f"{ui}/#/experiments/{experiment.experiment_id}/runs/{trained.info.run_id}"
                  "/model-metrics?workflowType=machine_learning")  # fmt: skip
        page.get_by_text("test_accuracy").first.wait_for()
        _close_assistant(page)
        charts = page.locator("main").first.inner_text()  # the charts drawn so far
        first = charts.split("Model metrics", 1)[1].split("\n")  # "(25)", then chart titles
        assert [line for line in first if line.startswith(("test_", "system/", "train_"))][:2] == [
            "test_accuracy",
            "test_macro_f1",
        ], charts
        assert "epoch_seconds" not in charts and "validation." not in charts
        page.screenshot(path=SCREENSHOTS / "mlflow-run-charts.png")

        page.goto(f"{ui}/#/models/{MODEL}?workflowType=machine_learning")
        history = page.locator("table", has_text="first model meeting the floor").first
        history.wait_for()
        _close_assistant(page)
        assert "champion" in history.inner_text() and "challenger" in history.inner_text()
        page.screenshot(path=SCREENSHOTS / "mlflow-model.png", full_page=True)

        page.goto(f"{ui}/#/models/{MODEL}/versions/1?workflowType=machine_learning")
        page.get_by_text("Promotion").first.wait_for()
        _close_assistant(page)
        text = page.locator("body").inner_text()
        assert "promoted to champion" in text and "Takes 1x8x8 uint8 pixels" in text
        page.screenshot(path=SCREENSHOTS / "mlflow-version.png", full_page=True)
