"""The Great Expectations gate: clean data passes; each bad-input row fails by name."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ValidateConfig
from pipeline.data.store import Split
from pipeline.validate import sample_table, validate_dataset

CFG = ValidateConfig(min_rows_per_split=50, pixel_min=0, pixel_max=255)


def _run(ds, tmp_path: Path):
    return validate_dataset(ds, ds.meta(), CFG, tmp_path / "gx")


def _with_test(ds, images=None, labels=None):
    return replace(
        ds,
        test=Split(
            ds.test.images if images is None else images,
            ds.test.labels if labels is None else labels,
        ),
    )


def test_clean_digits_pass_and_data_docs_are_written(digits, tmp_path):
    report = _run(digits, tmp_path)
    assert report.success, report.describe()
    assert report.evaluated >= 20 and not report.failed
    assert Path(report.docs).is_file() and "<html" in Path(report.docs).read_text().lower()


def _bad_label(ds):
    labels = ds.test.labels.copy()
    labels[:3] = 11
    return _with_test(ds, labels=labels)


def _missing_class(ds):
    keep = ds.test.labels != 7
    return _with_test(ds, ds.test.images[keep], ds.test.labels[keep])


def _nan_pixels(ds):
    images = ds.test.images.astype(np.float32)
    images[0, 0, 0, 0] = np.nan
    images[1, 0, 2, 2] = np.inf
    return _with_test(ds, images=images)


def _wrong_shape(ds):
    images = np.zeros((len(ds.test.labels), 1, 9, 8), np.uint8)
    return _with_test(ds, images=images)


def _empty_split(ds):
    return _with_test(ds, ds.test.images[:0], ds.test.labels[:0])


def _leak(ds):
    images = ds.test.images.copy()
    images[:5] = ds.train.images[:5]
    return _with_test(ds, images=images)


def _out_of_range(ds):
    return _with_test(ds, images=ds.test.images.astype(np.int16) * 2)


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (_bad_label, {"label_in_class_set"}),
        (_missing_class, {"every_class_present"}),
        (_nan_pixels, {"no_nan_or_inf", "dtype_is_uint8"}),
        (_wrong_shape, {"height_matches"}),
        (_empty_split, {"min_rows", "every_class_present"}),
        (_leak, {"no_duplicates_of_train"}),
        (_out_of_range, {"pixel_max_in_range", "dtype_is_uint8"}),
    ],
)
def test_bad_test_split_fails_the_named_expectations(digits, tmp_path, corrupt, expected):
    report = _run(corrupt(digits), tmp_path)
    assert not report.success
    failed = {f["name"] for f in report.failed if f["split"] == "test"}
    assert expected <= failed, report.describe()
    assert all(f["split"] == "test" for f in report.failed), report.describe()
    assert "FAILED" in report.describe() and Path(report.docs).is_file()


def test_report_shows_observed_values(digits, tmp_path):
    report = _run(_bad_label(digits), tmp_path)
    (failure,) = [f for f in report.failed if f["name"] == "label_in_class_set"]
    assert "3 bad rows" in failure["observed"] and "11" in failure["observed"]


def test_sample_table_has_one_row_per_image(digits):
    table = sample_table(digits, "test")
    assert len(table) == len(digits.test.labels)
    assert not table["in_train"].any() and (table["nonfinite"] == 0).all()
