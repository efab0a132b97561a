"""The training DAG's trigger form as a user fills it, in headless Chromium against a real
api-server: the lr field takes `auto` (its help text offers it) as well as a number, and the
run it triggers carries what was typed. The screenshot lands in outputs/screenshots/."""

import json
import sqlite3
import subprocess

import pytest

from tests.conftest import BIN, free_port, project_env, run, stop_group
from tests.e2e.browser import SCREENSHOTS, chromium
from tests.e2e.live import wait_http

pytestmark = pytest.mark.slow
DAG = "train_image_classifier"


@pytest.fixture
def api_server(from_template):
    """(UI address, project): the DAGs serialized, the api-server up, everyone an admin."""
    project = from_template("airflow")
    env = {**project_env(project), "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"}
    run(["airflow", "dags", "reserialize"], project, env=env)
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(port)],
        cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/api/v2/monitor/health", proc, seconds=180)
        yield f"http://127.0.0.1:{port}", project
    finally:
        stop_group(proc)


@pytest.mark.parametrize("typed, sent", [("auto", "auto"), ("0.003", 0.003)])
def test_the_trigger_forms_lr_field_takes_auto_or_a_number(api_server, tmp_path, typed, sent):
    url, project = api_server
    with chromium(tmp_path / "chromium-profile") as page:
        page.goto(f"{url}/dags/{DAG}")
        page.get_by_role("button", name="Trigger").first.click()
        lr = page.locator("[name=element_lr]")
        lr.wait_for()
        lr.fill(typed)
        page.keyboard.press("Tab")
        assert not page.get_by_text("Value must be one of").count()
        lr.scroll_into_view_if_needed()
        if typed == "auto":
            page.screenshot(path=SCREENSHOTS / "airflow-trigger-form.png")
        page.get_by_role("dialog").get_by_role("button", name="Trigger").click()
        page.get_by_role("dialog").wait_for(state="hidden")
    with sqlite3.connect(project / ".airflow" / "airflow.db") as db:  # what the run will read
        (conf,) = db.execute("SELECT conf FROM dag_run WHERE run_type = 'manual'").fetchone()
    assert json.loads(conf)["lr"] == sent
    # Untouched fields go as null: the preset's or params.yaml's value, never a form default.
    assert json.loads(conf)["epochs"] is None and json.loads(conf)["optimizer"] is None
