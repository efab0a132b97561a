"""`pipeline serve`'s parts without a server: request bodies read as MLflow's scoring server
reads them (refused in one line otherwise), and the batcher that scores concurrent requests
together without mixing versions."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from pipeline.serving.batcher import Batcher
from pipeline.serving.payload import Refused, check_headers, count, model_input

JSON = "application/json"
MANY = 10**6  # max_values where the test is not about it


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
    assert count(model_input(json.dumps(body).encode(), JSON, MANY)) == images


@pytest.mark.parametrize("body", [{"inputs": 5}, {"inputs": True}, {"instances": "aGk="}])
def test_a_single_value_counts_as_one_image(body):
    assert count(model_input(json.dumps(body).encode(), JSON, MANY)) == 1


def test_csv_is_read_as_a_data_frame_and_needs_its_header_line():
    data = model_input(b"image\naGk=\naGk=\n", check_headers("text/csv; charset=utf-8", None), MANY)
    assert count(data) == 2 and list(data.columns) == ["image"]
    image = b"iVBORw0KGgo" + b"A" * 200  # a first line that is an image, not a column name
    with pytest.raises(Refused, match="add a header line"):
        model_input(image + b"\n" + image + b"\n", "text/csv", MANY)


@pytest.mark.parametrize(
    "body, mime",
    [
        (b'{"inputs": [' + b"0," * 2_000_000 + b"0]}", JSON),  # 4 MB of zeros
        (b",".join([b"a"] * 2_000_000) + b"\nA\n", "text/csv"),  # 2 million columns
    ],
)
def test_values_are_counted_before_the_body_is_parsed(body, mime):
    with pytest.raises(Refused) as refused:
        model_input(body, mime, max_values=256 * 64 + 256)
    assert (refused.value.status, refused.value.reason) == (413, "too_many_values")


@pytest.mark.parametrize(
    "content_type, encoding, words",
    [
        ("application/xml", None, "application/json or text/csv"),
        ("application/SECRET", None, "application/json or text/csv"),
        ("application/json, application/json", None, "application/json or text/csv"),  # twice
        ("application/json", "identity, br", "uncompressed"),  # two Content-Encoding headers
        (None, None, "application/json or text/csv"),
        ("application/json; charset=latin-1", None, "charset=utf-8"),
        ("application/json; format=pandas-split", None, "charset=utf-8"),
        ("application/json", "gzip", "uncompressed"),
    ],
)
def test_media_types_charsets_and_encodings_mlflow_refuses_are_415(content_type, encoding, words):
    with pytest.raises(Refused, match=words) as refused:
        check_headers(content_type, encoding)
    assert refused.value.status == 415 and "SECRET" not in str(refused.value)
    assert check_headers("Application/JSON; charset=UTF-8", "identity") == JSON


@pytest.mark.parametrize(
    "body, status, reason, words",
    [
        (b"[" * 100_000 + b"]" * 100_000, 400, "bad_json", "nested too deeply"),
        (b'{"inputs": ' + b"[" * 900 + b"]" * 900 + b"}", 400, "bad_json", "nested too deeply"),
        (b'{"inputs": [' + b"9" * 5000 + b"]}", 400, "bad_json", "4300 digits"),
        (b'{"inputs": "\xff"}', 400, "bad_encoding", "not UTF-8 (byte 12)"),
        (b"[1, 2]", 400, "bad_format", "it is no object"),
        (b'{"inputs": [1], "instances": [1]}', 400, "bad_format", "2 of them"),
        (b'{"SECRET_' + b"A" * 10**6 + b'": 1}', 400, "bad_format", "1 keys, 0 of them"),
        (b'{"dataframe_split": 7}', 400, "bad_format", ""),
        (
            b'{"dataframe_split": {"columns": ["c"], "data": [["x"]], "SECRET\\nSECRET": '
            + b"1" * 3000
            + b"}}",
            400,
            "bad_format",
            "",
        ),
    ],
)
def test_bodies_that_do_not_parse_are_refused_in_one_short_line(body, status, reason, words):
    with pytest.raises(Refused) as refused:
        model_input(body, JSON, MANY)
    message = str(refused.value)
    assert (refused.value.status, refused.value.reason) == (status, reason)
    assert words in message and "\n" not in message and len(message) < 300
    assert "9999999999" not in message and "AAAAAAAAAA" not in message  # never echoed whole


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


def test_a_webhook_delivery_signed_as_mlflow_signs_is_taken_and_others_are_not():
    import time

    from mlflow.webhooks.delivery import _generate_hmac_signature

    from pipeline.serving import webhook

    body = json.dumps(
        {"entity": "model_version_alias", "action": "created",
         "data": {"name": "m", "alias": "champion", "version": "2"}}
    )  # fmt: skip
    stamp = str(int(time.time()))
    headers = {
        "x-mlflow-delivery-id": "d-1",
        "x-mlflow-timestamp": stamp,
        "x-mlflow-signature": _generate_hmac_signature("s3cret", "d-1", stamp, body),
    }
    event = webhook.verify("s3cret", headers, body.encode())
    assert webhook.concerns(event, "m", "champion")
    assert not webhook.concerns(event, "m", "challenger") and not webhook.concerns(
        event, "n", "champion"
    )
    for forged, words in (
        ({**headers, "x-mlflow-signature": "v1,AAAA"}, "signature"),
        ({**headers, "x-mlflow-delivery-id": "d-2"}, "signature"),  # the id is signed too
        ({k: v for k, v in headers.items() if k != "x-mlflow-signature"}, "signature"),
        ({**headers, "x-mlflow-timestamp": str(int(stamp) - 301)}, "300 s old"),
        ({**headers, "x-mlflow-timestamp": "soon"}, "Timestamp"),
    ):
        with pytest.raises(webhook.Rejected, match=words) as rejected:
            webhook.verify("s3cret", forged, body.encode())
        assert rejected.value.status == 401
    with pytest.raises(webhook.Rejected, match="signature"):
        webhook.verify("other", headers, body.encode())
