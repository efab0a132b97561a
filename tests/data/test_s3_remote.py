"""An S3 DVC remote, against moto's S3-compatible server on loopback (a real HTTP server)."""

import shutil
import subprocess
import time

import pytest

from pipeline.data.versioning import pointer
from tests.conftest import BIN, free_port, git, run

pytestmark = pytest.mark.integration
BUCKET = "pipeline-data"


@pytest.fixture
def s3():
    """A moto S3 server process with an empty bucket; yields (endpoint url, boto3 client)."""
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    try:
        for _ in range(100):
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # not listening yet
                time.sleep(0.1)
        else:
            raise RuntimeError("moto_server did not start")
        yield url, client
    finally:
        server.terminate()
        server.wait(timeout=10)


def _use_s3_remote(project, url: str) -> None:
    """The README's S3 setup: the remote in .dvc/config (committed: DVC reads the committed
    config too, and credentials for a remote it does not know there break it), credentials in
    the git-ignored .dvc/config.local."""
    run(["dvc", "remote", "add", "-d", "s3", f"s3://{BUCKET}/dvc"], project)
    run(["dvc", "remote", "modify", "s3", "endpointurl", url], project)
    git(project, "commit", "-qam", "data remote: S3")
    for key in ("access_key_id", "secret_access_key"):
        run(["dvc", "remote", "modify", "--local", "s3", key, "testing"], project)


def _objects(client) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def test_data_is_pushed_to_and_pulled_back_from_s3(project, s3):
    url, client = s3
    _use_s3_remote(project, url)
    run(["pipeline", "data", "pull"], project)
    version = pointer(project)
    stored = _objects(client)
    assert len(stored) == version["nfiles"] + 1  # every file plus the directory listing
    assert any(key.endswith(".dir") for key in stored)

    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    checked = run(["pipeline", "check-data"], project).stdout
    assert version["md5"] in checked and (project / "data" / "meta.json").exists()


def test_a_version_missing_from_s3_and_the_cache_is_a_clear_error(project, s3):
    url, client = s3
    _use_s3_remote(project, url)
    run(["pipeline", "data", "pull"], project)
    for key in _objects(client):
        client.delete_object(Bucket=BUCKET, Key=key)
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    missing = run(["pipeline", "check-data"], project, check=False)
    assert missing.returncode == 1
    assert "not in the local cache or the DVC remote" in missing.stderr
