"""What a name or a path from outside (the CLI, params.yaml, a trigger form) may reach: only
the project's own files, refused in one line before anything is written."""

import sqlite3

import pytest

from tests.conftest import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "cmd",
    [
        ["pipeline", "rollback", "../../../../../decoy"],
        ["pipeline", "promote", "../../../../../decoy/1", "--force", "--reason", "x"],
        ["pipeline", "register", "--set", "register.model_name=../../../../../decoy"],
        ["pipeline", "rollback", ".."],
    ],
)
def test_a_model_name_that_is_a_path_is_refused_before_any_file_is_touched(project, cmd):
    decoy = project.parent / "decoy.lock"  # where the lock of such a name would have been
    decoy.write_text("keep me")
    refused = run(cmd, project, check=False)
    assert refused.returncode == 2, refused.stderr
    assert "a model name is one word of a path" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert decoy.read_text() == "keep me"
    assert not (project / "outputs" / "locks").exists() or not any(
        (project / "outputs" / "locks").iterdir()
    )


def test_an_emptied_store_is_refused_and_a_locked_one_is_transient(project):
    run(["pipeline", "data", "pull"], project)
    store = project / ".mlflow" / "mlflow.db"
    store.parent.mkdir()
    store.write_bytes(b"")  # a registry truncated by a full disk or a bad copy
    for cmd in (["pipeline", "validate"], ["pipeline", "history", "image-classifier"]):
        refused = run(cmd, project, check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert "is an empty file (0 bytes): its registry and runs are gone" in refused.stderr
        assert store.stat().st_size == 0  # never re-created as a new, empty registry

    store.unlink()
    run(["pipeline", "validate"], project)  # a store with one experiment
    holder = sqlite3.connect(store)
    holder.execute("BEGIN EXCLUSIVE")  # another process in a long write
    try:
        refused = run(["pipeline", "history", "image-classifier"], project, check=False)
    finally:
        holder.rollback()
        holder.close()
    (line,) = refused.stderr.strip().splitlines()
    assert "stayed locked by another process" in line and "move it aside" not in line
    assert "no registered model" in run(["pipeline", "history", "image-classifier"], project,
                                        check=False).stderr  # fmt: skip
