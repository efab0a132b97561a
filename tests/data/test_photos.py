"""Photos as phones and people make them, decoded as a viewer shows them: EXIF orientation,
transparency, any format Pillow reads, decompression bombs, hidden folders and files that are no
images; and the one decode function that ingest, predict and the served model share."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import DataError
from pipeline.data.contract import InputContract
from pipeline.data.images import BadImage
from pipeline.data.inputs import open_inputs
from pipeline.data.sources import write_source
from pipeline.data.store import read_dataset, read_meta


def _ingest(root, out, **data):
    write_source("imagefolder", DataConfig(source_dir=str(root), workers=1, **data), out)
    return read_dataset(out)


def _images(ds) -> np.ndarray:
    return np.concatenate([ds.train.images, ds.test.images])


def _halves(size=(48, 24)) -> np.ndarray:
    """w x h RGB: the left half dark (30), the right half bright (220)."""
    w, h = size
    pixels = np.full((h, w, 3), 220, np.uint8)
    pixels[:, : w // 2] = 30
    return pixels


def _folder(root, n=3, size=(24, 48), extra=None):
    """Two classes of plain photos shown as `size` (w x h); `extra(root)` adds the file under
    test."""
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = size
            Image.fromarray(np.full((h, w, 3), 60 + 40 * c + i, np.uint8)).save(
                root / cls / f"{i}.png"
            )
    if extra:
        extra(root)
    return root


def test_a_portrait_phone_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    def portrait(root):  # stored 48 wide x 24 high, shown 24 x 48 (orientation 6: 90 deg CW)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(_halves()).save(root / "a" / "phone.jpg", exif=exif, quality=95)

    ds = _ingest(_folder(tmp_path / "imgs", extra=portrait), tmp_path / "data")
    assert ds.shape == (3, 48, 24)  # as shown: no "is 48x24, others 24x48" error
    contract = InputContract.from_dict(read_meta(tmp_path / "data")["contract"])
    shown = contract.decode(tmp_path / "imgs" / "a" / "phone.jpg")
    # Turned 90 degrees clockwise, the stored left (dark) half is on top.
    assert shown.shape == (3, 48, 24)
    assert shown[:, :20].mean() < 60 and shown[:, 28:].mean() > 190
    assert any(np.array_equal(shown, image) for image in _images(ds))


def test_transparency_is_composited_onto_the_configured_background(tmp_path):
    def logo(root):  # a black square on a transparent background
        rgba = np.zeros((48, 24, 4), np.uint8)
        rgba[16:32, 4:20, 3] = 255
        Image.fromarray(rgba, "RGBA").save(root / "a" / "logo.png")
        palette = Image.fromarray(rgba, "RGBA").convert("P")  # palette + transparency
        palette.save(root / "b" / "logo.gif", transparency=palette.getpixel((0, 0)))

    root = _folder(tmp_path / "imgs", extra=logo)
    _ingest(root, tmp_path / "white")
    white = InputContract.from_dict(read_meta(tmp_path / "white")["contract"])
    for name in ("a/logo.png", "b/logo.gif"):
        shown = white.decode(root / name)
        assert shown[:, 0, 0].tolist() == [255, 255, 255]  # the background, as a viewer shows
        assert shown[:, 24, 12].tolist() == [0, 0, 0]  # the black shape stays black
    _ingest(root, tmp_path / "gray", background="#808080")
    gray = InputContract.from_dict(read_meta(tmp_path / "gray")["contract"])
    assert gray.decode(root / "a/logo.png")[:, 0, 0].tolist() == [128, 128, 128]
    with pytest.raises(ValueError, match="'chartreuse-ish' is not a color"):
        DataConfig(background="chartreuse-ish")


def _png_header_only(path, width, height):
    """A tiny PNG file whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def test_a_decompression_bomb_is_a_bad_image_named_with_its_size_and_skippable(tmp_path):
    root = _folder(
        tmp_path / "imgs", extra=lambda r: _png_header_only(r / "b" / "bomb.png", 20000, 10000)
    )
    with pytest.raises(DataError, match=r"bomb\.png: too many pixels.*200000000 pixels"):
        _ingest(root, tmp_path / "data", image_size=16)
    _ingest(root, tmp_path / "data", image_size=16, on_bad_image="skip")
    skipped = read_meta(tmp_path / "data")["skipped"]
    assert [s["path"] for s in skipped] == ["b/bomb.png"]
    # Under Pillow's own limit, ours (data.max_image_pixels) names the size in pixels.
    _png_header_only(root / "b" / "bomb.png", 4000, 3000)
    with pytest.raises(DataError, match=r"4000x3000 is 12,000,000 pixels, over the limit of 10,0"):
        _ingest(root, tmp_path / "data", image_size=16, max_image_pixels=10_000_000)


def test_hidden_folders_and_files_are_never_classes_or_images(tmp_path):
    root = tmp_path / "imgs"
    _folder(root / "train", n=4)
    _folder(root / "val", n=2)
    for hidden in (".ipynb_checkpoints", "__MACOSX", "train/.ipynb_checkpoints", "val/a/.cache"):
        (root / hidden).mkdir(parents=True)
        Image.new("RGB", (24, 48)).save(root / hidden / "copy.png")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    Image.new("RGB", (24, 48)).save(root / "train" / "b" / ".hidden.png")
    ds = _ingest(root, tmp_path / "data")
    assert ds.classes == ["a", "b"]  # the ImageNet layout is still seen; no hidden class
    assert (len(ds.train.labels), len(ds.test.labels)) == (8, 4)
    assert read_meta(tmp_path / "data")["skipped"] == []


def test_every_file_pillow_reads_is_ingested_and_other_files_are_listed(tmp_path):
    def odd(root):
        Image.new("RGB", (24, 48), (10, 200, 30)).save(root / "a" / "scan", "PNG")  # no suffix
        Image.new("RGB", (24, 48), (10, 200, 30)).save(root / "a" / "photo.jfif", "JPEG")
        Image.new("RGB", (24, 48), (10, 200, 30)).save(root / "b" / "frame.ppm")
        (root / "a" / "README.md").write_text("# my photos\n")
        (root / "a" / "LICENSE").write_text("MIT\n")  # no suffix, no image
        (root / "b" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + b"\0" * 60)
        (root / "b" / "notes.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")  # Pillow writes PDF only
        (root / "notes.txt").write_text("beside the class folders\n")

    ds = _ingest(_folder(tmp_path / "imgs", extra=odd), tmp_path / "data")  # on_bad_image: fail
    assert len(_images(ds)) == 9
    skipped = {s["path"]: s["reason"] for s in read_meta(tmp_path / "data")["skipped"]}
    no_image = "not an image file (Pillow does not read it)"
    assert skipped == {
        "a/LICENSE": no_image,
        "a/README.md": no_image,
        "b/Thumbs.db": no_image,
        "b/notes.pdf": no_image,
        "notes.txt": "not inside a class folder",
    }


def test_corrupt_and_truncated_images_are_bad_images_named_and_skippable(tmp_path):
    def broken(root):
        (root / "a" / "x.png").write_bytes(b"junk")
        whole = (root / "b" / "0.png").read_bytes()
        (root / "b" / "cut.png").write_bytes(whole[: len(whole) // 2])  # truncated pixel data

    root = _folder(tmp_path / "imgs", extra=broken)
    with pytest.raises(DataError, match=r"x\.png: not a readable image.*\(and 1 more\)"):
        _ingest(root, tmp_path / "data")
    _ingest(root, tmp_path / "data", on_bad_image="skip")
    skipped = {s["path"]: s["reason"] for s in read_meta(tmp_path / "data")["skipped"]}
    assert set(skipped) == {"a/x.png", "b/cut.png"} and "truncated" in skipped["b/cut.png"]
    contract = InputContract.from_dict(read_meta(tmp_path / "data")["contract"])
    with pytest.raises(DataError, match=r"cannot read image .*cut\.png: .*truncated"):
        open_inputs(root / "b", contract)


def test_sub_folders_of_a_class_belong_to_it_and_odd_split_folders_are_named(tmp_path):
    root = _folder(tmp_path / "imgs")
    for year in ("2019", "2020"):
        (root / "b" / year).mkdir()
        Image.new("RGB", (24, 48), (1, 2, 3)).save(root / "b" / year / "old.png")
    ds = _ingest(root, tmp_path / "data")
    assert np.bincount(np.concatenate([ds.train.labels, ds.test.labels])).tolist() == [3, 5]
    for layout in (("train", "val", "test"), ("train", "val", "misc"), ("Train", "Test")):
        for folder in layout:
            _folder(tmp_path / "-".join(layout) / folder)
        listed = ", ".join(f"{f}/" for f in sorted(layout))
        with pytest.raises(DataError, match=f"holds {listed}; with split folders it must hold"):
            _ingest(tmp_path / "-".join(layout), tmp_path / "data2")


def test_a_class_folder_without_images_is_refused_at_the_pull(tmp_path):
    def documents(root):
        (root / "c").mkdir()
        (root / "c" / "notes.txt").write_text("no photos here\n")

    with pytest.raises(DataError, match=r"class folder\(s\) \['c'\] .* hold no readable images"):
        _ingest(_folder(tmp_path / "imgs", extra=documents), tmp_path / "data")


def test_predict_reads_a_folder_the_way_ingest_does(tmp_path):
    def extra(root):
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(_halves((64, 32))).save(root / "a" / "phone.jpg", exif=exif)
        (root / "a" / "README.md").write_text("not a photo")
        (root / ".ipynb_checkpoints").mkdir()
        Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "x.png")

    root = _folder(tmp_path / "imgs", size=(32, 64), extra=extra)
    ds = _ingest(root, tmp_path / "data", image_size=16, resize="pad")
    contract = InputContract.from_dict(read_meta(tmp_path / "data")["contract"])
    (root / "a" / "elsewhere.png").symlink_to(root.parent / "secret.png")  # never read
    found = open_inputs(root, contract)
    assert found.skipped == {
        "a/README.md": "not an image file (Pillow does not read it)",
        "a/elsewhere.png": f"a link (to {root.parent / 'secret.png'}): links are never read",
    }
    scored = np.concatenate(list(found.batches()))
    assert sorted(map(bytes, scored.astype(np.uint8))) == sorted(map(bytes, _images(ds)))


def test_high_bit_images_follow_the_datasets_depth_and_beyond_it_are_refused(tmp_path):
    contract = InputContract((1, 8, 8), ("a", "b"), None, 12, (255, 255, 255), True, 10**6)
    twelve = tmp_path / "twelve.png"
    Image.fromarray(np.full((8, 8), 4095, np.uint16)).save(twelve)
    assert contract.decode(twelve).max() == 255  # 12-bit white, scaled by the dataset's depth
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(np.full((8, 8), 60000, np.uint16)).save(sixteen)
    with pytest.raises(BadImage, match="do not fit the 12-bit depth the model was trained on"):
        contract.decode(sixteen)
    with pytest.raises(BadImage, match="is 9x8; the model takes 8x8 images and was trained "):
        Image.new("L", (9, 8)).save(tmp_path / "wide.png")
        contract.decode(tmp_path / "wide.png")


_PEAK = """
import resource, sys
import numpy as np
from pipeline.data.contract import InputContract
contract = InputContract((1, 28, 28), ("a", "b"), "squash", 16, (255, 255, 255), True, 89_478_485)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pixels = contract.decode(open(sys.argv[1], "rb").read(), served=True)
assert pixels.shape == (1, 28, 28) and pixels.max() == 255, pixels.max()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_files_sent_to_a_model_are_bounded_from_the_header_and_high_bits_decode_narrow(
    tmp_path, monkeypatch
):
    import subprocess
    import sys

    # A 16-bit PNG of 4096 x 4096 (the serving limit) is 0.1 MB on disk, 32 MB decoded.
    gray = np.zeros((4096, 4096), np.uint16)
    gray[:2048] = 65535  # the top half white
    Image.fromarray(gray).save(tmp_path / "big16.png")
    del gray
    peak = int(subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "big16.png")],
                              capture_output=True, text=True, check=True).stdout)  # fmt: skip
    # The file in Pillow (2 bytes a pixel), its bytes (2), one int32 working copy (4) and the
    # 8-bit result (1): 9 bytes a pixel; widening to int64 twice cost 21.
    assert peak < 10 * 4096 * 4096, f"{peak / 2**20:.0f} MiB to decode a 16-MP 16-bit PNG"

    contract = InputContract((1, 8, 8), ("a", "b"), "squash", 16, (255, 255, 255), True, 10**8)
    _png_header_only(tmp_path / "bomb.png", 6000, 6000)
    with pytest.raises(BadImage, match=r"6000x6000 is 36,000,000 pixels, over the limit of "
                       r"16,777,216 \(PIPELINE_SERVE_MAX_PIXELS\)"):  # fmt: skip
        contract.decode((tmp_path / "bomb.png").read_bytes(), served=True)
    with pytest.raises(DataError, match=r"bomb\.png: 6000x6000 is 36,000,000 pixels"):
        open_inputs(tmp_path, contract)  # pipeline predict on a folder: probed, not decoded
    monkeypatch.setenv("PIPELINE_SERVE_MAX_PIXELS", "1000")
    assert contract.pixel_limit(served=True) == (1000, "PIPELINE_SERVE_MAX_PIXELS")
    monkeypatch.setenv("PIPELINE_SERVE_MAX_PIXELS", str(10**9))  # never above the contract's
    assert contract.pixel_limit(served=True) == (10**8, "data.max_image_pixels")
