"""`pipeline serve`'s parts without a server: request bodies read as MLflow's scoring server
reads them (refused in one line otherwise), and the batcher that scores concurrent requests
together without mixing versions."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from pipeline.serving.batcher import Batcher
from pipeline.serving.payload import Refused, count, model_input

JSON = "application/json"


@pytest.mark.parametrize(
    "body, images",
    [
        ({"inputs": [[[0] * 4] * 4] * 3}, 3),  # N x H x W numbers
        ({"instances": [[[[0] * 4] * 4]] * 2}, 2),  # N x C x H x W
        ({"inputs": ["aGk=", "aGk="]}, 2),  # base64 files
        ({"dataframe_split": {"columns": ["image"], "data": [["aGk="]] * 5}}, 5),
        ({"dataframe_records": [{"image": "aGk="}] * 4}, 4),
    ],
)
def test_each_json_format_parses_and_counts_its_images(body, images):
    assert count(model_input(json.dumps(body).encode(), JSON)) == images


def test_csv_is_read_as_a_data_frame():
    data = model_input(b"image\naGk=\naGk=\n", "text/csv; charset=utf-8")
    assert count(data) == 2 and list(data.columns) == ["image"]


@pytest.mark.parametrize(
    "body, content_type, status, reason, words",
    [
        (b"<a/>", "application/xml", 415, "content_type", "application/json or text/csv"),
        (b"{}", None, 415, "content_type", "not nothing"),
        (b"[" * 100_000 + b"]" * 100_000, JSON, 400, "bad_json", "nested too deeply"),
        (b'{"inputs": [' + b"9" * 5000 + b"]}", JSON, 400, "bad_json", "4300 digits"),
        (b'{"inputs": "\xff"}', JSON, 400, "bad_json", "utf-8"),
        (b"[1, 2]", JSON, 400, "bad_format", "it has none"),
        (b'{"inputs": [1], "instances": [1]}', JSON, 400, "bad_format", "one of inputs"),
        (b'{"dataframe_split": 7}', JSON, 400, "bad_format", ""),
        (b"\xff\xfe", "text/csv", 400, "bad_encoding", "UTF-8"),
    ],
)
def test_bodies_that_do_not_parse_are_refused_in_one_short_line(
    body, content_type, status, reason, words
):
    with pytest.raises(Refused) as refused:
        model_input(body, content_type)
    message = str(refused.value)
    assert (refused.value.status, refused.value.reason) == (status, reason)
    assert words in message and "\n" not in message and len(message) < 300
    assert "9999999999" not in message  # the request is never echoed


class _Model:
    """A stand-in version: probabilities that say which batch scored each image."""

    def __init__(self):
        self.batches: list[int] = []

    def score(self, pixels: np.ndarray) -> np.ndarray:
        self.batches.append(len(pixels))
        return np.full((len(pixels), 1), len(self.batches), np.float32)


def test_requests_queued_together_share_a_batch_of_one_version_each():
    old, new = _Model(), _Model()
    sizes: list[int] = []

    async def scenario():
        batcher = Batcher(max_batch=8, max_wait_s=0, observe=sizes.append)
        runner = asyncio.create_task(batcher.run())
        order = [(old, 3), (old, 3), (new, 1), (old, 1), (new, 4), (new, 4), (new, 4)]
        answers = await asyncio.gather(
            *(batcher.score(model, np.zeros((n, 1, 2, 2), np.float32)) for model, n in order)
        )
        runner.cancel()
        return [len(a) for a in answers], [int(a[0, 0]) for a in answers]

    lengths, batch_ids = asyncio.run(scenario())
    assert lengths == [3, 3, 1, 1, 4, 4, 4]  # each request gets back its own rows
    # queued together: the first two old requests share a batch; the version change and the
    # max_batch of 8 (4 + 4, then 4) start new ones; no batch mixes versions
    assert old.batches == [6, 1] and new.batches == [1, 8, 4]
    assert sizes == [6, 1, 1, 8, 4] and batch_ids == [1, 1, 1, 2, 2, 2, 3]


def test_a_failed_batch_fails_each_of_its_requests_and_the_batcher_goes_on():
    class Broken(_Model):
        def score(self, pixels):
            raise RuntimeError("out of memory")

    async def scenario():
        batcher = Batcher(max_batch=8, max_wait_s=0, observe=lambda n: None)
        runner = asyncio.create_task(batcher.run())
        broken = [batcher.score(Broken(), np.zeros((1, 1, 2, 2), np.float32)) for _ in range(2)]
        failed = await asyncio.gather(*broken, return_exceptions=True)
        after = await batcher.score(_Model(), np.zeros((2, 1, 2, 2), np.float32))
        runner.cancel()
        return failed, after

    failed, after = asyncio.run(scenario())
    assert [str(f) for f in failed] == ["out of memory", "out of memory"]
    assert after.shape == (2, 1)
