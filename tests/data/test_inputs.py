"""Images to score are checked whole but read a batch at a time."""

import numpy as np
import pytest
from PIL import Image

from pipeline.data import contract, inputs
from pipeline.data.contract import InputContract
from pipeline.data.inputs import open_inputs
from pipeline.errors import DataError


def _contract(shape, resize=None) -> InputContract:
    classes = ("a", "b")
    return InputContract(shape, classes, resize, 8, (255, 255, 255), True, 10**6)


def test_an_array_is_scored_a_batch_at_a_time_and_checked_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "BATCH", 100)
    monkeypatch.setattr(contract, "CHUNK", 100)
    pixels = np.random.default_rng(0).integers(0, 256, (250, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", pixels)
    found = open_inputs(tmp_path / "x.npy", _contract((1, 8, 8)))
    batches = list(found.batches())
    assert [len(b) for b in batches] == [100, 100, 50] and len(found.names) == 250
    assert np.array_equal(np.concatenate(batches), pixels)
    pixels[230, 0, 3, 3] = np.inf  # in the last batch: found before anything is scored
    np.save(tmp_path / "x.npy", pixels)
    with pytest.raises(DataError, match=r"1 NaN/Inf values \(first in image 230\)"):
        open_inputs(tmp_path / "x.npy", _contract((1, 8, 8)))


def test_a_folder_is_read_a_batch_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "BATCH", 4)
    for i in range(10):
        Image.fromarray(np.full((12, 20, 3), i * 20, np.uint8)).save(tmp_path / f"{i:02d}.png")
    found = open_inputs(tmp_path, _contract((1, 8, 8), "squash"))
    batches = list(found.batches())
    assert [b.shape for b in batches] == [(4, 1, 8, 8), (4, 1, 8, 8), (2, 1, 8, 8)]
    assert found.names[:2] == ["00.png", "01.png"]
    assert [int(b[k].mean()) for b in batches for k in range(len(b))] == [i * 20 for i in range(10)]


def test_one_image_scaled_to_0_1_in_a_batch_is_refused_by_its_index(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (40, 1, 8, 8)).astype(np.float32)
    pixels[17] /= 255  # one image normalized by mistake, the others on the 0..255 scale
    np.save(tmp_path / "x.npy", pixels)
    with pytest.raises(DataError, match=r"x\.npy looks scaled to 0\.\.1 \(image 17: values 0\.."):
        open_inputs(tmp_path / "x.npy", _contract((1, 8, 8)))
    np.save(tmp_path / "one.npy", pixels[0, 0])  # one H x W image without the batch axis
    with pytest.raises(DataError, match="looks like one image: add the first axis"):
        open_inputs(tmp_path / "one.npy", _contract((1, 8, 8)))
