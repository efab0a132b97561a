"""The MLflow model's input parsing: what MLflow hands it (object arrays from JSON, bytes, numpy
arrays) becomes pixels through the contract, or a one-line refusal."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.contract import InputContract
from pipeline.tracking.served import pixels

CONTRACT = InputContract((1, 4, 4), ("a", "b"), "squash", 8, (255, 255, 255), True, 10**6)


def _scored(values) -> np.ndarray:
    return np.concatenate(list(pixels(values, CONTRACT)))


def _png(size=(8, 8), value=100) -> bytes:
    out = io.BytesIO()
    Image.new("L", size, value).save(out, "PNG")
    return out.getvalue()


def test_files_as_bytes_or_base64_and_json_numbers_become_the_same_pixels():
    as_bytes = np.array([_png(), _png(value=7)], dtype=object)
    as_base64 = np.array([base64.b64encode(b).decode() for b in as_bytes], dtype=object)
    assert np.array_equal(_scored(as_bytes), _scored(as_base64))
    assert _scored(as_bytes)[:, 0, 0, 0].tolist() == [100, 7]  # squashed 8x8 -> 4x4
    json_numbers = np.array(np.full((2, 1, 4, 4), 9).tolist(), dtype=object)  # MLflow's parse
    assert _scored(json_numbers).dtype == np.float32 and _scored(json_numbers).max() == 9


@pytest.mark.parametrize(
    "values, message",
    [
        (np.array([[[[True] * 4] * 4]], dtype=object), "the input holds bool values"),
        (np.array([[[[1, 2, 3, None]] * 4]], dtype=object), "neither numbers nor encoded image"),
        (np.array([[1, 2], [3]], dtype=object), "the input is ragged"),
        (np.zeros((0,), dtype=object), r"the input holds no images \(shape \[0\]\)"),
        (np.array(["bm90IGFuIGltYWdl"], dtype=object), "image 0: not a readable image"),
        (np.array(["not base64!"], dtype=object), "the input's image 0: not base64"),
        (np.full((2, 1, 4, 4), 0.5), r"looks scaled to 0\.\.1 \(image 0"),
    ],
)
def test_what_the_contract_refuses_is_one_line_naming_the_input(values, message):
    with pytest.raises(ValueError, match=message):
        _scored(values)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_tampered_weights_file_is_refused_in_one_line_and_never_runs(tmp_path):
    import torch

    from pipeline.errors import CheckpointError
    from pipeline.tracking.weights import read_weights

    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "spec": _Payload(marker)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as refused:
        read_weights(tmp_path / "model.pt")
    message = str(refused.value)
    assert "refused to load model.pt: it holds more than tensors" in message
    assert "unsupported GLOBAL posix.system" in message and "weights_only=False" not in message
    assert "\n" not in message and not marker.exists()
