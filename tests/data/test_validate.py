"""The Great Expectations gate: clean data passes; each bad-input row fails by name."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ValidateConfig
from pipeline.data.store import Split
from pipeline.data.validation import sample_table, split_stats, summary, validate_dataset

CFG = ValidateConfig(min_rows_per_split=50, pixel_min=0, pixel_max=255)


def _run(ds, tmp_path: Path, reference=None, cfg=CFG):
    return validate_dataset(ds, ds.meta(), cfg, tmp_path / "gx", reference)


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


def _imbalanced(ds):
    keep = (ds.test.labels != 3) | (np.cumsum(ds.test.labels == 3) <= 5)  # 5 threes left
    return _with_test(ds, ds.test.images[keep], ds.test.labels[keep])


def _brighter(ds):
    return _with_test(ds, images=np.clip(ds.test.images.astype(np.int16) + 60, 0, 255).astype("u1"))


def _float_labels(ds):
    return _with_test(ds, labels=ds.test.labels.astype(np.float32) + 0.7)


def _clipped(ds):  # what 12-bit images become when cut at 255 instead of scaled
    return _with_test(ds, images=np.clip(ds.test.images.astype(np.int32) * 16, 0, 255).astype("u1"))


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (_float_labels, {"labels_are_integers"}),
        (_clipped, {"not_saturated_at_255"}),
        (_imbalanced, {"class_balance"}),
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


def test_float_labels_fail_naming_their_dtype(digits, tmp_path):
    (failure,) = _run(_float_labels(digits), tmp_path).failed
    assert failure["name"] == "labels_are_integers" and "float32" in failure["observed"]


def test_saturation_reports_the_share_against_its_configured_bound(digits, tmp_path):
    (failure,) = _run(_clipped(digits), tmp_path).failed
    assert "allowed <= 0.5" in failure["observed"] and float(failure["observed"].split()[0]) > 0.5
    off = CFG.model_copy(update={"max_share_at_255": None})
    assert _run(_clipped(digits), tmp_path, cfg=off).success


def test_a_one_class_dataset_fails_in_both_splits(digits, tmp_path):
    one = replace(
        digits,
        classes=["only"],
        train=Split(digits.train.images, np.zeros_like(digits.train.labels)),
        test=Split(digits.test.images, np.zeros_like(digits.test.labels)),
    )
    failed = {(f["split"], f["name"]) for f in _run(one, tmp_path).failed}
    assert failed == {("train", "at_least_two_classes"), ("test", "at_least_two_classes")}


def test_declared_class_set_is_checked_when_configured(digits, tmp_path):
    expected = CFG.model_copy(update={"classes": [str(i) for i in range(10)]})
    assert _run(digits, tmp_path, cfg=expected).success
    other = CFG.model_copy(update={"classes": ["cat", "dog"]})
    report = _run(digits, tmp_path, cfg=other)
    assert {f["name"] for f in report.failed} == {"declared_classes"}
    assert '"0", "1"' in report.failed[0]["observed"]


def test_report_shows_observed_values(digits, tmp_path):
    report = _run(_bad_label(digits), tmp_path)
    (failure,) = [f for f in report.failed if f["name"] == "label_in_class_set"]
    assert "3 bad rows" in failure["observed"] and "11" in failure["observed"]


def test_sample_table_has_one_row_per_image(digits):
    table = sample_table(digits, "test")
    assert len(table) == len(digits.test.labels)
    assert not table["in_train"].any() and (table["nonfinite"] == 0).all()


def test_class_balance_reports_the_ratio_against_the_configured_bound(digits, tmp_path):
    report = _run(_imbalanced(digits), tmp_path)
    (failure,) = report.failed
    assert failure["name"] == "class_balance" and "allowed <= 2" in failure["observed"]
    ratio = float(failure["observed"].split()[0])
    assert ratio == pytest.approx(report.stats["test"]["class_ratio"], rel=1e-3) and ratio > 5
    relaxed = CFG.model_copy(update={"max_class_ratio": 100.0})
    assert _run(_imbalanced(digits), tmp_path, cfg=relaxed).success


def test_drift_against_the_champions_training_data(digits, tmp_path):
    reference = split_stats(sample_table(digits, "train"))
    assert _run(digits, tmp_path, reference).success  # the data the champion saw: no drift
    report = _run(_brighter(digits), tmp_path, reference)
    failed = {(f["split"], f["name"]) for f in report.failed}
    assert ("test", "pixel_mean_drift") in failed and ("train", "pixel_mean_drift") not in failed
    (shift,) = [f for f in report.failed if f["name"] == "pixel_mean_drift"]
    low, high = reference["pixel_mean"] - 10, reference["pixel_mean"] + 10
    assert f"allowed {low:g}..{high:g}" in shift["observed"]
    off = CFG.model_copy(update={"drift_max_shift": None})
    assert _run(_brighter(digits), tmp_path, reference, cfg=off).success


def test_summary_counts_and_names_failures_for_mlflow(digits, tmp_path):
    report = _run(_bad_label(digits), tmp_path).to_dict()
    metrics, tags = summary(report)
    assert metrics["validation.failed"] == 1
    assert metrics["validation.passed"] == metrics["validation.evaluated"] - 1
    assert tags == {
        "validation.success": "false",
        "validation.failed_expectations": "test.label_in_class_set",
    }


def test_a_missing_class_is_named_with_its_split(digits, tmp_path):
    report = _run(_missing_class(digits), tmp_path)
    (failure,) = [f for f in report.failed if f["name"] == "every_class_present"]
    missing = sorted(set(range(10)) - set(_missing_class(digits).test.labels.tolist()))
    assert failure["observed"].startswith("no test images of class ")
    assert all(f"'{digits.classes[i]}' (label {i})" in failure["observed"] for i in missing)


def test_no_progress_bars_flood_the_logs(digits, tmp_path, capfd):
    _run(digits, tmp_path)
    out, err = capfd.readouterr()
    assert "Calculating Metrics" not in out + err
