"""The registry in production: concurrent registration, retries, rollback and history, MLflow
going down mid-register, and predictions from the CLI, `mlflow models serve` and the batch DAG."""

import json
import subprocess

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline.tracking.weights import export_model
from tests.conftest import BIN, free_port, project_env, run, stop_group
from tests.e2e.live import ServedModel, wait_http
from tests.templates import add_airflow_db, trained_run

pytestmark = pytest.mark.slow
NAME = "image-classifier"
QUICK = ["--set", "train.epochs=2"]
LOW_FLOOR = ["--set", "register.floor=0.5"]  # 2 epochs: the policy, not the floor, decides


def _train(project, seed: int) -> str:
    out = run(["pipeline", "train", *QUICK, "--set", f"base.seed={seed}"], project).stdout
    run_id = json.loads(out)["run_id"]
    run(["pipeline", "evaluate", "--run-id", run_id], project)
    return run_id


@pytest.fixture
def two_runs(from_template):
    """Two evaluated, unregistered runs (seeds 42 and 2) of the default recipe, 2 epochs."""
    project = from_template("trained")
    return project, trained_run(project), _train(project, 2)


def _client(project) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project}/.mlflow/mlflow.db")


def _aliases(client) -> dict:
    return {a: int(v) for a, v in client.get_registered_model(NAME).aliases.items()}


def test_concurrent_and_retried_registration_rollback_and_history(two_runs):
    project, a, b = two_runs
    procs = [
        subprocess.Popen(
            [str(BIN / "pipeline"), "register", "--run-id", run_id, *LOW_FLOOR],
            cwd=project,
            env=project_env(project),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run_id in (a, b)
    ]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(r["version"] for r in results) == [1, 2]  # distinct versions
    client = _client(project)
    versions = client.search_model_versions(f"name='{NAME}'")
    assert {v.tags["registration.status"] for v in versions} == {"complete"}
    by_run = {v.run_id: int(v.version) for v in versions}
    accuracy = {r: client.get_run(r).data.metrics["test_accuracy"] for r in (a, b)}
    first, second = sorted((a, b), key=lambda r: by_run[r])
    aliases = _aliases(client)
    # The second registration was decided against whatever the first one left as champion.
    expected = second if accuracy[second] >= accuracy[first] else first
    assert aliases["champion"] == by_run[expected] and aliases["challenger"] == 2

    retried = json.loads(run(["pipeline", "register", "--run-id", a, *LOW_FLOOR], project).stdout)
    assert retried["version"] == by_run[a]
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2  # no duplicate

    for run_id in (a, b):  # decision report and model card beside each model
        files = {f.path for f in client.list_artifacts(run_id)} | {
            f.path for f in client.list_artifacts(run_id, "promotion")
        }
        assert {"model_card.md", "promotion/decision.json", "promotion/decision.md"} <= files
    card = client.download_artifacts(a, "model_card.md")
    text = open(card).read()
    assert "## Intended use" in text and "## Limitations" in text and "| 9 |" in text

    # Force the other version in, then roll back: champion and previous-champion swap.
    other = 3 - aliases["champion"]
    forced = run(
        ["pipeline", "promote", f"{NAME}/{other}", "--force", "--reason", "canary won"], project
    )
    assert json.loads(forced.stdout)["rule"] == "forced"
    assert _aliases(client)["champion"] == other
    assert _aliases(client)["previous-champion"] == 3 - other
    run(["pipeline", "rollback", NAME, "--reason", "canary regressed"], project)
    assert _aliases(client)["champion"] == 3 - other
    assert _aliases(client)["previous-champion"] == other

    history = json.loads(run(["pipeline", "history", NAME, "--json"], project).stdout)
    champion_moves = [(e["version"], e["reason"]) for e in history if e["alias"] == "champion"]
    assert champion_moves[-2][0] == other and "canary won" in champion_moves[-2][1]
    assert champion_moves[-1] == (3 - other, "rollback: canary regressed")
    table = run(["pipeline", "history", NAME], project).stdout
    assert "rollback: canary regressed" in table and "cli:" in table

    no_reason = run(["pipeline", "promote", f"{NAME}/1", "--force"], project, check=False)
    assert no_reason.returncode == 2 and "--force needs --reason" in no_reason.stderr


def _photos(folder, classes=("cat", "dog"), per_class=130):
    """Two classes of 8x8 grayscale noise around different brightness, all distinct."""
    rng = np.random.default_rng(0)
    for k, cls in enumerate(classes):
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.normal(60 + 120 * k, 20, (8, 8)).clip(1, 254).astype(np.uint8)
            Image.fromarray(pixels).save(folder / cls / f"{i:03d}.png")
    return folder


def test_a_model_for_other_classes_takes_champion_only_when_forced(from_template, tmp_path):
    project = from_template("registered")  # v1: the 10-class digits champion
    photos = _photos(tmp_path / "photos")
    run(
        ["pipeline", "data", "pull", "--dataset", "imagefolder", "--source-dir", str(photos)],
        project,
    )
    other = ["--set", "base.dataset=imagefolder"]
    run(["pipeline", "validate", *other], project)
    run_id = json.loads(run(["pipeline", "train", *QUICK, *other], project).stdout)["run_id"]
    run(["pipeline", "evaluate", "--run-id", run_id, *other], project)
    out = json.loads(run(["pipeline", "register", *LOW_FLOOR, *other], project).stdout)
    assert (out["version"], out["promoted"], out["rule"]) == (2, False, "incompatible_champion")
    assert "2 classes [cat, dog]" in out["reason"] and "10 classes" in out["reason"]
    client = _client(project)
    assert _aliases(client) == {"champion": 1, "challenger": 2}
    report = json.loads(open(client.download_artifacts(run_id, "promotion/decision.json")).read())
    assert report["decision"]["rule"] == "incompatible_champion"

    forced = ["pipeline", "promote", f"{NAME}/2", "--force", "--reason", "new task: pets"]
    assert json.loads(run([*forced, *other], project).stdout)["rule"] == "forced"
    assert _aliases(client)["champion"] == 2 and _aliases(client)["previous-champion"] == 1
    # back to v1 through the policy, on the pets: refused in the one line every stage says
    said = run(["pipeline", "promote", f"{NAME}/1", *other], project, check=False)
    assert said.returncode == 1 and said.stderr.count("\n") == 1, said.stderr
    assert f"{NAME} v1 was built for other inputs or classes than data/ holds (model: 10 " in (
        said.stderr
    )
    assert "check out its data version first (`pipeline lineage`), or --force" in said.stderr


@pytest.mark.long
def test_mlflow_server_down_mid_register_then_completed(from_template, tmp_path):
    project = from_template("validated")  # validation records nothing in MLflow when it passes
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    command = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{store}/mlflow.db",
        "--artifacts-destination",
        str(store / "artifacts"),
        "--workers",
        "1",
    ]
    env = {
        **project_env(project),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner to drain on each stop
    }

    def start():
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        return proc

    def pipeline(*args, check=True):
        result = subprocess.run(
            [str(BIN / "pipeline"), *args],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert not check or result.returncode == 0, result.stderr[-3000:]
        return result

    server = start()
    try:
        run_id = json.loads(pipeline("train", *QUICK).stdout)["run_id"]
        pipeline("evaluate")
        # The server lost in the middle of a training: one line, once MLflow's retries are spent.
        long = subprocess.Popen(
            [str(BIN / "pipeline"), "train", "--set", "train.epochs=200"], cwd=project,
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for line in long.stderr:
            if line.split()[:2] == ["epoch", "2/200"]:
                break
    finally:
        stop_group(server)
    _, err = long.communicate(timeout=300)
    assert long.returncode == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow at {env['MLFLOW_TRACKING_URI']} stopped answering")
    assert "--resume" in last
    env["PIPELINE_MLFLOW_WAIT_S"] = "3"
    down = pipeline("register", check=False)  # the CLI waits a bounded time, then says so
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert down.stderr.startswith(f"MLflow at {env['MLFLOW_TRACKING_URI']} not reachable")
    assert "did not answer for 3 s" in down.stderr and "nothing was changed" in down.stderr
    as_a_task = (  # what the DAG's register task calls: MLflow's own retries, then a clear error
        "from pipeline.config import load_config\n"
        "from pipeline.errors import RegistryUnavailable\n"
        "from pipeline.settings import Settings\n"
        "from pipeline.stages.register import register_stage\n"
        "settings = Settings.from_env()\n"
        "try:\n"
        f"    register_stage(load_config(settings.params), settings, {run_id!r})\n"
        "except RegistryUnavailable as exc:\n"
        "    print(exc)\n"
    )
    task = subprocess.run(
        [str(BIN / "python"), "-c", as_a_task], cwd=project, env=env, capture_output=True, text=True
    )
    assert "is unreachable" in task.stdout and "the retry finds what this one" in task.stdout, (
        task.stderr
    )

    server = start()
    try:
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        assert client.search_model_versions(f"name='{NAME}'") == []  # nothing half-registered
        # What a register killed right after creating its version leaves behind:
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        pending = mlflow.register_model(
            export_model(run_id), NAME, tags={"registration.status": "pending"}
        )
        refused = pipeline("promote", f"{NAME}/{pending.version}", check=False)
        assert refused.returncode == 1 and "did not finish registering" in refused.stderr
        status = pipeline("status").stdout
        assert "(pending)" in status
        done = json.loads(pipeline("register", *LOW_FLOOR).stdout)  # completes that version
        assert done["version"] == int(pending.version) and done["promoted"]
        (only,) = client.search_model_versions(f"name='{NAME}'")
        assert only.tags["registration.status"] == "complete"
    finally:
        stop_group(server)


@pytest.mark.long
def test_predict_from_the_cli_the_served_model_and_the_batch_dag(
    from_template, templates, tmp_path
):
    project = from_template("registered")
    a = trained_run(project)
    images = np.load(project / "data" / "test_images.npy")
    labels = np.load(project / "data" / "test_labels.npy")
    np.save(tmp_path / "test.npy", images)

    out = tmp_path / "pred.json"
    run(
        ["pipeline", "predict", "--input", str(tmp_path / "test.npy"), "--output", str(out)],
        project,
    )
    result = json.loads(out.read_text())
    sha256 = _client(project).get_model_version(NAME, "1").tags["weights.sha256"]
    assert result["model"] == {"name": NAME, "version": 1, "run_id": a, "weights_sha256": sha256}
    predicted = np.array([int(r["prediction"]) for r in result["predictions"]])
    recorded = _client(project).get_run(a).data.metrics["test_accuracy"]
    assert (predicted == labels).mean() == pytest.approx(recorded)
    first = result["predictions"][0]
    assert abs(sum(first[f"p_{k}"] for k in range(10)) - 1) < 1e-4

    folder = tmp_path / "inbox"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(images[i, 0]).save(folder / f"img{i:02d}.png")
    csv_out = tmp_path / "pred.csv"
    run(["pipeline", "predict", "--input", str(folder), "--output", str(csv_out)], project)
    lines = csv_out.read_text().splitlines()
    assert lines[0].startswith("input,prediction,probability,p_0,")
    assert [int(line.split(",")[1]) for line in lines[1:]] == predicted[:12].tolist()
    assert all(line.endswith(f",{NAME}/1") for line in lines[1:])

    with ServedModel(project, f"models:/{NAME}@champion") as served:
        status, answer = served.invocations(images[:12].tolist())  # uint8 as JSON numbers
    assert status == 200
    served_classes = [int(row["prediction"]) for row in answer["predictions"]]
    assert served_classes == predicted[:12].tolist()

    add_airflow_db(templates, project)
    batch_out = tmp_path / "batch.csv"
    conf = {"input": str(folder), "output": str(batch_out)}
    dags_test = ["airflow", "dags", "test", "batch_predict", "-c", json.dumps(conf)]
    refused = run(dags_test, project, check=False)  # tmp_path is outside the project
    roots = f"{project / 'inbox'}, {project / 'outputs' / 'predictions'}"
    assert f"input {folder} is outside the folders this may use ({roots})" in (
        refused.stdout + refused.stderr
    )
    records = {**conf, "input": str(project / "inbox"), "output": "outputs/train.json"}
    (project / "inbox").mkdir()
    overwrite = ["airflow", "dags", "test", "batch_predict", "-c", json.dumps(records)]
    before = (project / "outputs" / "train.json").read_bytes()
    refused = run(overwrite, project, check=False)
    assert f"output {project / 'outputs' / 'train.json'} is outside the folders" in (
        refused.stdout + refused.stderr
    )
    assert (project / "outputs" / "train.json").read_bytes() == before  # records untouched
    assert not batch_out.exists()
    log = run(dags_test, project, env={"PIPELINE_PREDICT_ROOTS": f"/nonexistent:{tmp_path}"})
    assert "state=success" in log.stdout + log.stderr
    assert batch_out.read_text().splitlines() == lines  # same model, pinned, same predictions
    from pipeline.monitoring.log import ParquetStore

    logged = ParquetStore(project / "outputs" / "monitor" / "predictions").read().to_pylist()
    logged.sort(key=lambda row: row["time"])
    assert len(logged) == len(images) + 12 + 12  # pipeline predict twice, the batch DAG once
    assert [r["input"] for r in logged[-12:]] == [line.split(",")[0] for line in lines[1:]]
    assert {r["source"] for r in logged} == {"predict"}


@pytest.mark.long
def test_promotions_from_two_workspaces_take_one_lock_in_the_registrys_database(
    from_template, new_database, tmp_path
):
    """Two workspaces that share nothing but a PostgreSQL-backed MLflow server: an alias move
    in one waits while the other holds the registry's lock (a PostgreSQL advisory lock, not a
    file), and two registrations raced at once leave one champion and a history in which each
    move names the version the one before it left."""
    from pipeline.registry.versions import promotion_lock
    from pipeline.settings import Settings
    from tests.e2e.live import MlflowServer

    store = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{new_database('mlflow')}"
    a, b = from_template("validated"), from_template("validated", "elsewhere")
    artifacts = ["--artifacts-destination", str(tmp_path / "artifacts")]
    with MlflowServer(a, store, *artifacts) as server:
        env = {"MLFLOW_TRACKING_URI": server.url, "PIPELINE_REGISTRY_LOCK_URI": store}
        for project in (a, b):
            run(["pipeline", "train", *QUICK], project, env=env)
            run(["pipeline", "evaluate"], project, env=env)

        def pipeline(project, *args):
            return subprocess.Popen(
                [str(BIN / "pipeline"), *args],
                cwd=project,
                env={**project_env(project), **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        def coherent(history: list[dict]) -> int:
            """The champion the history ends on; each move names the one before it."""
            moves = [e for e in history if e["alias"] == "champion"]
            for before, after in zip(moves, moves[1:], strict=False):
                assert after["previous"] == before["version"], history
            return moves[-1]["version"]

        def champion() -> int:
            history = run(["pipeline", "history", NAME, "--json"], a, env=env).stdout
            held = [v for v in (1, 2) if "champion" in client.get_model_version(NAME, v).aliases]
            assert held == [coherent(json.loads(history))]
            return held[0]

        raced = [pipeline(p, "register", *LOW_FLOOR) for p in (a, b)]
        results = [json.loads(p.communicate(timeout=600)[0]) for p in raced]
        assert [p.returncode for p in raced] == [0, 0]
        assert sorted(r["version"] for r in results) == [1, 2]
        client = MlflowClient(tracking_uri=server.url)
        other = 3 - champion()

        # Held by a third party (no file of a's or b's): a promotion waits for it.
        third = Settings.from_env(tmp_path)
        third = Settings(**{**third.__dict__, "registry_lock": store})
        with promotion_lock(third, NAME):
            waiting = pipeline(b, "promote", f"{NAME}/{other}", "--force", "--reason", "by hand")
            said = ""
            while "waiting for the registry lock" not in said:
                said += waiting.stderr.readline()
                assert waiting.poll() is None, said
        out, err = waiting.communicate(timeout=300)
        assert waiting.returncode == 0, err[-2000:]
        assert champion() == other
