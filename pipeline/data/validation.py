"""Data validation: a Great Expectations 1.x suite over a per-sample table of each split.

A failed validation raises `ValidationFailed` naming each failed expectation with its observed
value, after the Data Docs (HTML) have been written, so nothing downstream trains on bad data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ValidateConfig
from pipeline.data.store import SPLITS, Dataset, chunks
from pipeline.files import exclusive

EXPECTED_DTYPE = "uint8"
INTEGER_DTYPES = [str(np.dtype(t)) for t in np.typecodes["AllInteger"]]
DRIFT = "_drift"  # the names of the drift bounds end so


@dataclass
class ValidationReport:
    success: bool
    evaluated: int
    failed: list[dict] = field(default_factory=list)  # {"split", "name", "observed"}
    docs: str = ""
    stats: dict = field(default_factory=dict)  # split -> rows, class_ratio, pixel_mean, contrast
    notes: list[str] = field(default_factory=list)  # checks that could not run, and why
    skipped: int = 0  # files left out when data/ was written (no images; data.on_bad_image)
    drift_evaluated: int = 0  # the drift bounds, evaluated against the champion's data

    def describe(self, *extra_notes: str) -> str:
        evaluated = self.evaluated + self.drift_evaluated
        head = f"validation {'passed' if self.success else 'FAILED'}: "
        head += f"{evaluated - len(self.failed)}/{evaluated} expectations met"
        lines = [f"  [{f['split']}] {f['name']}: observed {f['observed']}" for f in self.failed]
        notes = [f"  note: {n}" for n in (*self.notes, *extra_notes)]
        tail = [f"  Data Docs: {self.docs}"] if self.docs else []
        return "\n".join([head, *lines, *notes, *tail])

    def to_dict(self) -> dict:
        """What the data and the suite decide. Passed drift bounds leave no trace: they depend
        on which model is champion, and the hand-off must not (a new champion would re-run
        `dvc repro` from validate); failed ones are in `failed`."""
        out = asdict(self)
        del out["drift_evaluated"]
        return out


def summary(validation: dict) -> tuple[dict[str, float], dict[str, str]]:
    """(counts, tags) of a validation result (`ValidationReport.to_dict()`): the counts are
    numbers for the lineage record, logged as tags (a number logged once makes no chart)."""
    evaluated, failed = validation.get("evaluated", 0), validation.get("failed", [])
    metrics = {
        "validation.evaluated": evaluated,
        "validation.passed": evaluated - len(failed),
        "validation.failed": len(failed),
        "validation.skipped_files": validation.get("skipped", 0),
    }
    tags = {
        "validation.success": str(bool(validation.get("success"))).lower(),
        "validation.failed_expectations": ",".join(f"{f['split']}.{f['name']}" for f in failed),
    }
    return metrics, tags


def sample_table(ds: Dataset, split: str) -> pd.DataFrame:
    """One row per image: label, shape, dtype, pixel range, non-finite count, mean and contrast,
    share of pixels at 0 and at 255, leak flag; plus split-wide facts on every row (label dtype,
    declared class names, class ratio = largest / smallest class count), so one expectation
    reports each of them by value.

    Computed a chunk of images at a time over the (memory-mapped) split: memory holds one chunk
    and the table (a few numbers per image), never the split."""
    part = getattr(ds, split)
    images = part.images
    n = len(images)
    columns = {name: np.zeros(n) for name in PER_IMAGE}
    per_chunk = max(1, CHUNK_VALUES // max(1, int(np.prod(images.shape[1:]))))
    for start, chunk in chunks(images, per_chunk):
        for name, values in _image_stats(chunk).items():
            columns[name][start : start + len(chunk)] = values
    shape = images.shape[1:] if images.ndim == 4 else (None, None, None)
    table = pd.DataFrame(
        {
            "label": part.labels.astype(np.int64) if part.labels.ndim == 1 else -1,
            "label_dtype": str(part.labels.dtype),
            "class_names": json.dumps(list(ds.classes)),
            "channels": shape[0],
            "height": shape[1],
            "width": shape[2],
            "dtype": str(images.dtype),
            **columns,
            "class_ratio": _class_ratio(part.labels, len(ds.classes)) if n else [],
        }
    )
    if split == "test":
        train_hashes = {_digest(x) for _, chunk in chunks(ds.train.images) for x in chunk}
        table["in_train"] = [_digest(x) in train_hashes for _, c in chunks(images) for x in c]
    return table


PER_IMAGE = ("pixel_min", "pixel_max", "nonfinite", "pixel_mean", "contrast")
PER_IMAGE += ("share_at_0", "share_at_255")
CHUNK_VALUES = 1 << 22  # pixel values per chunk: 32 MB as float64


def _image_stats(chunk: np.ndarray) -> dict[str, np.ndarray]:
    flat = chunk.reshape(len(chunk), -1)
    as_float = flat.astype(np.float64, copy=False)
    finite = np.isfinite(as_float)
    with np.errstate(invalid="ignore"):  # an Inf image's std is NaN: no_nan_or_inf reports it
        means, contrast = as_float.mean(axis=1), as_float.std(axis=1)
    return {
        "pixel_min": np.where(finite, as_float, np.inf).min(axis=1),
        "pixel_max": np.where(finite, as_float, -np.inf).max(axis=1),
        "nonfinite": (~finite).sum(axis=1),
        "pixel_mean": _finite_or_nan(means),
        "contrast": _finite_or_nan(contrast),
        "share_at_0": (flat == 0).mean(axis=1),
        "share_at_255": (flat == 255).mean(axis=1),
    }


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
    """NaN/Inf images are no_nan_or_inf's to report; NaN keeps them out of the column means."""
    return np.where(np.isfinite(values), values, np.nan)


def _class_ratio(labels: np.ndarray, n_classes: int) -> float:
    """Largest / smallest count among the declared classes present; labels outside the class
    set and missing classes are other expectations' to report."""
    valid = labels[(labels >= 0) & (labels < n_classes)].astype(np.int64)
    counts = np.bincount(valid, minlength=n_classes)
    counts = counts[counts > 0]
    return float(counts.max() / counts.min()) if len(counts) else 1.0


def split_stats(table: pd.DataFrame) -> dict:
    """What the drift check compares and lineage records: size, balance, pixel statistics."""
    if table.empty:
        return {"rows": 0}
    return {
        "rows": len(table),
        "class_ratio": round(float(table["class_ratio"].iloc[0]), 4),
        "pixel_mean": round(float(table["pixel_mean"].mean()), 4),
        "contrast": round(float(table["contrast"].mean()), 4),
    }


def _digest(image: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()


def build_suite(
    name: str,
    split: str,
    ds: Dataset,
    declared: dict,
    cfg: ValidateConfig,
    reference: dict | None = None,
):
    """Expectations for one split; each carries a readable name in `meta`.

    `reference` (the champion's training-data `split_stats`) adds the drift bounds."""
    import great_expectations as gx

    E = gx.expectations
    classes = list(range(len(declared["classes"])))
    c, h, w = declared["shape"]
    checks = {
        "min_rows": E.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows_per_split),
        "labels_are_integers": E.ExpectColumnValuesToBeInSet(
            column="label_dtype", value_set=INTEGER_DTYPES
        ),
        "label_in_class_set": E.ExpectColumnValuesToBeInSet(column="label", value_set=classes),
        "at_least_two_classes": E.ExpectColumnUniqueValueCountToBeBetween(
            column="label", min_value=2
        ),
        "every_class_present": E.ExpectColumnDistinctValuesToContainSet(
            column="label", value_set=classes
        ),
        "channels_match": E.ExpectColumnValuesToBeInSet(column="channels", value_set=[c]),
        "height_matches": E.ExpectColumnValuesToBeInSet(column="height", value_set=[h]),
        "width_matches": E.ExpectColumnValuesToBeInSet(column="width", value_set=[w]),
        "dtype_is_uint8": E.ExpectColumnValuesToBeInSet(column="dtype", value_set=[EXPECTED_DTYPE]),
        "no_nan_or_inf": E.ExpectColumnValuesToBeInSet(column="nonfinite", value_set=[0]),
        "pixel_min_in_range": E.ExpectColumnValuesToBeBetween(
            column="pixel_min", min_value=cfg.pixel_min, max_value=cfg.pixel_max
        ),
        "pixel_max_in_range": E.ExpectColumnValuesToBeBetween(
            column="pixel_max", min_value=cfg.pixel_min, max_value=cfg.pixel_max
        ),
    }
    checks["class_balance"] = E.ExpectColumnMaxToBeBetween(
        column="class_ratio", max_value=cfg.max_class_ratio
    )
    if cfg.classes is not None:
        checks["declared_classes"] = E.ExpectColumnValuesToBeInSet(
            column="class_names", value_set=[json.dumps(cfg.classes)]
        )
    for value in (0, 255):
        limit = getattr(cfg, f"max_share_at_{value}")
        if limit is not None:
            checks[f"not_saturated_at_{value}"] = E.ExpectColumnMeanToBeBetween(
                column=f"share_at_{value}", max_value=limit
            )
    if reference and cfg.drift_max_shift:
        for column in ("pixel_mean", "contrast"):
            checks[f"{column}{DRIFT}"] = E.ExpectColumnMeanToBeBetween(
                column=column,
                min_value=reference[column] - cfg.drift_max_shift,
                max_value=reference[column] + cfg.drift_max_shift,
            )
    if split == "test":
        checks["no_duplicates_of_train"] = E.ExpectColumnValuesToBeInSet(
            column="in_train", value_set=[False]
        )
    suite = gx.ExpectationSuite(name=name)
    for check_name, expectation in checks.items():
        expectation.meta = {"name": check_name}
        suite.add_expectation(expectation)
    return suite


def _run_suites(
    ds: Dataset, declared: dict, cfg: ValidateConfig, gx_root: Path, reference: dict | None
) -> tuple[int, int, list[dict], dict]:
    """Each split's suite through a GX checkpoint in the file project at `gx_root` (Data Docs
    written): (expectations evaluated, drift ones, failures, the splits' sample tables)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no phone-home from a closed network
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="file", project_root_dir=str(gx_root))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # no bars in task logs
    source = ctx.data_sources.add_or_update_pandas(f"{ds.name}-samples")
    evaluated, drift, failed, definitions, frames = 0, 0, [], [], {}
    for split in SPLITS:
        asset = source.get_asset(split) if split in source.get_asset_names() else None
        asset = asset or source.add_dataframe_asset(name=split)
        batch = next(
            (b for b in asset.batch_definitions if b.name == "all"), None
        ) or asset.add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add_or_update(
            build_suite(f"{ds.name}-{split}", split, ds, declared, cfg, reference)
        )
        definitions.append(
            ctx.validation_definitions.add_or_update(
                gx.ValidationDefinition(data=batch, suite=suite, name=f"{ds.name}-{split}")
            )
        )
        frames[split] = sample_table(ds, split)
    for split, definition in zip(SPLITS, definitions, strict=True):
        checkpoint = ctx.checkpoints.add_or_update(
            gx.Checkpoint(
                name=f"{ds.name}-{split}",
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            )
        )
        result = checkpoint.run(batch_parameters={"dataframe": frames[split]})
        for run in result.run_results.values():
            for r in run.results:
                name = r.expectation_config.meta.get("name", r.expectation_config.type)
                if name.endswith(DRIFT):
                    drift += 1
                else:
                    evaluated += 1
                if not r.success:
                    observed = _observed(r.result, r.expectation_config.kwargs)
                    if name == "every_class_present":
                        observed = _missing(frames[split], ds.classes, split)
                    failed.append({"split": split, "name": name, "observed": observed})
    return evaluated, drift, failed, frames


def validate_dataset(
    ds: Dataset,
    declared: dict,
    cfg: ValidateConfig,
    gx_root: Path,
    reference: dict | None = None,
) -> ValidationReport:
    """Run the suite on every split, write Data Docs under `gx_root`, return the report.

    `reference`: the champion's training-data stats for the drift bounds (None: not checked;
    the caller says why)."""
    # One validation at a time in a GX project: two commands in one workspace would
    # otherwise save its suites under each other ("has changed since it was saved").
    with exclusive(gx_root / ".lock"):
        evaluated, drift, failed, frames = _run_suites(ds, declared, cfg, gx_root, reference)
    docs = gx_root / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    stats = {split: split_stats(frames[split]) for split in SPLITS}
    notes, skipped = [], len(declared.get("skipped", []))
    if skipped:
        notes.append(
            f"{skipped} files were left out when data/ was written (no images, or images that "
            "cannot be read with data.on_bad_image=skip); data/meta.json `skipped` lists them "
            "with the reasons"
        )
    return ValidationReport(
        not failed, evaluated, failed, str(docs), stats, notes, skipped, drift_evaluated=drift
    )


def _missing(table: pd.DataFrame, classes: list[str], split: str) -> str:
    """Which declared classes have no image in the split, by name."""
    present = set(table["label"].tolist()) if len(table) else set()
    gone = [f"{name!r} (label {i})" for i, name in enumerate(classes) if i not in present]
    return f"no {split} images of class {', '.join(gone)}" if gone else "every class present"


def _observed(result: dict, kwargs: dict) -> str:
    if "observed_value" in result:
        value, bounds = result["observed_value"], _bounds(kwargs)
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        return f"{shown} (allowed {bounds})" if bounds else shown
    if "unexpected_count" in result:
        sample = result.get("partial_unexpected_list", [])[:5]
        return f"{result['unexpected_count']} bad rows, e.g. {sample}"
    return str(result) or "exception while evaluating"


def _bounds(kwargs: dict) -> str:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if low is not None and high is not None:
        return f"{low:g}..{high:g}"
    if low is not None:
        return f">= {low:g}"
    return f"<= {high:g}" if high is not None else ""
