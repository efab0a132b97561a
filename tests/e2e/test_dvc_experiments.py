"""DVC's own workflow on a fresh copy of the project: `dvc exp run` in the workspace, queued and
in a temporary workspace, `dvc exp show`, `dvc metrics diff`, `dvc plots diff`, and `dvc repro`
after a promotion. Experiments run in DVC's workspaces, register into the project's registry,
and never move champion."""

import hashlib
import json
import time

import pytest
from mlflow import MlflowClient

from tests.conftest import git, run

pytestmark = pytest.mark.slow
MODEL = "image-classifier"


def _client(project) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")


def _champion(project) -> int:
    return int(_client(project).get_model_version_by_alias(MODEL, "champion").version)


def _snapshot(project) -> dict[str, str]:
    """md5 of every file in the workspace's data/, outputs/, reports/ and params.yaml."""
    files = [project / "params.yaml"]
    for folder in ("data", "outputs", "reports"):
        files += [p for p in sorted((project / folder).rglob("*")) if p.is_file()]
    return {str(p.relative_to(project)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


def _wait_for_queue(project, timeout_s: float = 1500) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], project).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(5)
    raise AssertionError(f"the DVC queue did not finish in {timeout_s} s:\n{status}")


def _main_reproduced(project) -> None:
    """The project reproduced on main, its results committed as a user commits them."""
    run(["pipeline", "data", "pull"], project)
    run(["dvc", "repro"], project)
    git(project, "add", "-A")
    git(project, "commit", "-qm", "reproduced")
    assert _champion(project) == 1


@pytest.mark.long
def test_queued_and_temp_experiments_run_apart_register_challengers_and_compare(project):
    _main_reproduced(project)
    before = _snapshot(project)

    # The first repeats main's params: the policy would promote it (a tie), but it is an
    # experiment. The second and third differ.
    run(["dvc", "exp", "run", "--queue", "-n", "q-same", "-S", "base.seed=42"], project)
    run(["dvc", "exp", "run", "--queue", "-n", "q-lr", "-S", "train.optimizer.lr=0.05"], project)
    # a hang guard only: under make test's four workers on two cores it once took over 600 s
    run(["dvc", "queue", "start", "-j", "1"], project, timeout=1500)
    status = _wait_for_queue(project)
    assert status.count("Success") == 2, status
    run(["dvc", "exp", "run", "--temp", "-n", "t-adam", "-S", "train.optimizer.name=adam"], project)

    assert _snapshot(project) == before  # the workspace is untouched; the registry is shared
    client = _client(project)
    assert _champion(project) == 1
    versions = {v.tags.get("dvc.experiment"): v for v in client.search_model_versions()}
    assert set(versions) == {None, "q-same", "q-lr", "t-adam"}
    report = client.download_artifacts(versions["q-same"].run_id, "promotion/decision.json")
    held = json.loads(open(report).read())
    assert held["decision"]["rule"] == "experiment"
    assert "pipeline promote image-classifier/" in held["decision"]["reason"]

    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    scores = {}
    for baseline in shown:
        for exp in [baseline, *(baseline.get("experiments") or [])]:
            for revision in exp.get("revs") or [exp]:
                data = revision["data"]
                metrics = data["metrics"]["reports/metrics.json"]["data"]
                scores[revision.get("name") or data["rev"]] = metrics
    assert {"workspace", "q-same", "q-lr", "t-adam"} <= set(scores), scores.keys()
    for name, metrics in scores.items():
        assert 0.9 <= metrics["test_accuracy"] <= 1 and 0.9 <= metrics["test_macro_f1"] <= 1, name

    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "q-lr", "--json"], project).stdout)
    accuracy = diff["reports/metrics.json"]["test_accuracy"]
    assert accuracy["old"] == scores["workspace"]["test_accuracy"]
    assert accuracy["new"] == scores["q-lr"]["test_accuracy"]

    shown = run(["dvc", "plots", "diff", "HEAD", "q-lr", "--json"], project).stdout
    plots = json.loads(shown)["data"]
    assert set(plots) == {"loss", "val_accuracy", "per_class_recall", "confusion"}
    for name, (plot,) in plots.items():  # each overlays both revisions' data series
        revisions = {row["rev"] for row in plot["content"]["data"]["values"]}
        assert revisions == {"HEAD", "q-lr"}, (name, revisions)


@pytest.mark.long
def test_dvc_repro_after_a_promotion_or_a_validate_rerun_reruns_nothing(project):
    _main_reproduced(project)
    # validate ran before the promotion of v1; run again, as the training DAG does in a
    # deployment's checkout, it checks drift against v1 now.
    assert "drift checked against champion v1" in run(["pipeline", "validate"], project).stdout
    assert "up to date" in run(["dvc", "status"], project).stdout
    again = run(["dvc", "repro"], project).stdout
    assert "Running stage" not in again, again
    assert not git(project, "status", "--porcelain"), "dvc repro changed tracked files"
