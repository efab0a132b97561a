"""Headless Debian Chromium driven by Playwright, for tests that look at the Airflow and MLflow UIs.
Screenshots land in outputs/screenshots/ (git-ignored)."""

from __future__ import annotations

import json
import shutil
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO

SCREENSHOTS = REPO / "outputs" / "screenshots"
# The network here is closed: without these, Chromium keeps dialling Google's services.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def chromium(profile: Path, login: tuple[str, str] | None = None):
    """A page in headless Chromium with a fresh user-data-dir; `login`: (user, password)
    answered to a server's basic-auth challenge (MLflow's)."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(
            "Debian's chromium is not installed: run `make browser` (apt-get install chromium)"
        )
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=FLAGS,
            viewport={"width": 1400, "height": 1250},
            http_credentials={"username": login[0], "password": login[1]} if login else None,
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def mlflow_compare(
    page, mlflow: str, experiment_id: str, runs: dict[str, str], metric: str = "test_accuracy"
) -> str:
    """Open MLflow's compare page for {run_id: run_name}: the parallel-coordinates plot against
    `metric`, differing params only; screenshot it and return the differing-params table's text."""
    url = (
        f"{mlflow}/#/compare-runs?runs={urllib.parse.quote(json.dumps(list(runs)))}"
        f"&experiments={urllib.parse.quote(json.dumps([experiment_id]))}"
    )
    page.goto(url)
    for name in runs.values():
        page.get_by_text(name, exact=True).first.wait_for()
    page.locator("svg.main-svg").first.wait_for()  # the parallel-coordinates plot has drawn
    metrics = page.get_by_role("combobox").nth(1)  # the plot's metric picker
    metrics.click()
    metrics.press("Backspace")  # MLflow picks the first metric alphabetically
    metrics.fill(metric)
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    page.get_by_text("Show diff only").first.click()
    assistant = page.get_by_role("button", name="Close")
    if assistant.count():
        assistant.first.click()  # the side panel would hide half the table
    params = page.locator("table", has_text="train.optimizer.name").first.inner_text()
    page.screenshot(path=SCREENSHOTS / "mlflow-compare.png")
    return params


def airflow_dag(page, airflow: str, dag_id: str, password: str) -> tuple[str, str]:
    """Log in to the Airflow UI, open the DAG's page and screenshot it; returns the latest run's
    state badge and the run it links to."""
    page.goto(f"{airflow}/dags/{dag_id}")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**/dags/{dag_id}")
    latest = page.locator("[data-testid=stat]", has_text="Latest Run")
    badge = latest.locator("[data-testid=state-badge]")
    badge.wait_for()
    page.locator("text=register").first.wait_for()  # the grid has loaded
    page.screenshot(path=SCREENSHOTS / "airflow-dag.png")
    run_link = urllib.parse.unquote(latest.locator("a").first.get_attribute("href"))
    return badge.get_attribute("aria-label"), run_link
