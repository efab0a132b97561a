"""Where a command's workspace and the project's shared state are: the working directory (or
PIPELINE_ROOT), and in a `dvc exp run` DVC's workspace with the state of the project DVC names."""

import subprocess

import pytest

from pipeline.settings import Settings
from pipeline.tracking.lineage import git_state

EXPERIMENT = ("DVC_EXP_NAME", "DVC_ROOT", "DVC_EXP_BASELINE_REV")


@pytest.fixture
def env(monkeypatch):
    for name in ("PIPELINE_ROOT", "MLFLOW_TRACKING_URI", "MLFLOW_ARTIFACT_ROOT", *EXPERIMENT):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_workspace_is_the_nearest_folder_with_params_yaml_up_from_cwd(tmp_path, env):
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "docs" / "deep").mkdir(parents=True)
    env.chdir(tmp_path / "docs" / "deep")
    settings = Settings.from_env()
    assert settings.root == tmp_path and settings.store == tmp_path / ".mlflow"
    assert settings.tracking_uri == f"sqlite:///{tmp_path}/.mlflow/mlflow.db"
    env.setenv("PIPELINE_ROOT", str(tmp_path / "docs"))
    assert Settings.from_env().root == tmp_path / "docs"


def test_an_experiment_works_in_dvcs_workspace_with_the_projects_store(tmp_path, env):
    project, workspace = tmp_path / "project", tmp_path / "project/.dvc/tmp/exps/tmp1"
    workspace.mkdir(parents=True)
    (workspace / "params.yaml").write_text("{}\n")
    env.chdir(workspace)
    env.setenv("PIPELINE_ROOT", str(project))  # exported by a Makefile: not the workspace here
    env.setenv("DVC_EXP_NAME", "bushy-lake")
    env.setenv("DVC_ROOT", str(project))
    settings = Settings.from_env()
    assert settings.root == workspace and settings.outputs == workspace / "outputs"
    assert settings.data_dir == workspace / "data"
    assert settings.series == workspace / "reports" / "plots"
    assert settings.store == project / ".mlflow" and settings.locks == project / "outputs/locks"
    assert settings.tracking_uri == f"sqlite:///{project}/.mlflow/mlflow.db"
    assert settings.study_storage == f"sqlite:///{project}/.mlflow/optuna.db"


def test_a_checkout_is_dirty_for_code_not_for_results_or_params(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@l", *args],
                       cwd=tmp_path, check=True, capture_output=True)  # fmt: skip

    (tmp_path / "reports").mkdir()
    for name in ("dvc.lock", "reports/metrics.json", "params.yaml", "model.py"):
        (tmp_path / name).write_text("1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "first")
    for name in ("dvc.lock", "reports/metrics.json", "params.yaml"):  # results; `dvc exp -S`
        (tmp_path / name).write_text("2\n")
    assert git_state(tmp_path)[1] is False
    (tmp_path / "model.py").write_text("2\n")
    assert git_state(tmp_path)[1] is True


def test_outside_a_project_the_cli_says_so_and_makes_no_store(tmp_path, env, capsys):
    from pipeline.cli import main

    env.chdir(tmp_path)
    assert main(["status"]) == 2
    assert f"no params.yaml in {tmp_path} or a folder above it" in capsys.readouterr().err
    assert not (tmp_path / ".mlflow").exists()


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    import sys
    from pathlib import Path

    cli = Path(sys.executable).parent / "pipeline"
    proc = subprocess.Popen([cli, "choices"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head -1` does once it has its line
    assert proc.wait(timeout=60) == 0
    assert b"Traceback" not in proc.stderr.read()
