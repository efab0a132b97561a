"""Data validation: a Great Expectations 1.x suite over a per-sample table of each split.

A failed validation raises `ValidationFailed` naming each failed expectation with its observed
value, after the Data Docs (HTML) have been written, so nothing downstream trains on bad data.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ValidateConfig
from pipeline.data.store import SPLITS, Dataset

EXPECTED_DTYPE = "uint8"


class ValidationFailed(RuntimeError):
    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__(report.describe())


@dataclass
class ValidationReport:
    success: bool
    evaluated: int
    failed: list[dict] = field(default_factory=list)  # {"split", "name", "observed"}
    docs: str = ""

    def describe(self) -> str:
        head = f"validation {'passed' if self.success else 'FAILED'}: "
        head += f"{self.evaluated - len(self.failed)}/{self.evaluated} expectations met"
        lines = [f"  [{f['split']}] {f['name']}: observed {f['observed']}" for f in self.failed]
        tail = [f"  Data Docs: {self.docs}"] if self.docs else []
        return "\n".join([head, *lines, *tail])

    def to_dict(self) -> dict:
        return asdict(self)


def sample_table(ds: Dataset, split: str) -> pd.DataFrame:
    """One row per image: label, shape, dtype, pixel range, non-finite count, leak flag."""
    part = getattr(ds, split)
    images = part.images
    n = len(images)
    flat = images.reshape(n, -1) if n else np.zeros((0, 1))
    as_float = flat.astype(np.float64, copy=False)
    finite = np.isfinite(as_float)
    shape = images.shape[1:] if images.ndim == 4 else (None, None, None)
    table = pd.DataFrame(
        {
            "label": part.labels.astype(np.int64) if part.labels.ndim == 1 else -1,
            "channels": shape[0],
            "height": shape[1],
            "width": shape[2],
            "dtype": str(images.dtype),
            "pixel_min": np.where(finite, as_float, np.inf).min(axis=1) if n else [],
            "pixel_max": np.where(finite, as_float, -np.inf).max(axis=1) if n else [],
            "nonfinite": (~finite).sum(axis=1) if n else [],
        }
    )
    if split == "test":
        train_hashes = {_digest(x) for x in ds.train.images}
        table["in_train"] = [_digest(x) in train_hashes for x in images]
    return table


def _digest(image: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()


def build_suite(name: str, split: str, ds: Dataset, declared: dict, cfg: ValidateConfig):
    """Expectations for one split; each carries a readable name in `meta`."""
    import great_expectations as gx

    E = gx.expectations
    classes = list(range(len(declared["classes"])))
    c, h, w = declared["shape"]
    checks = {
        "min_rows": E.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows_per_split),
        "label_in_class_set": E.ExpectColumnValuesToBeInSet(column="label", value_set=classes),
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
    if split == "test":
        checks["no_duplicates_of_train"] = E.ExpectColumnValuesToBeInSet(
            column="in_train", value_set=[False]
        )
    suite = gx.ExpectationSuite(name=name)
    for check_name, expectation in checks.items():
        expectation.meta = {"name": check_name}
        suite.add_expectation(expectation)
    return suite


def validate_dataset(
    ds: Dataset, declared: dict, cfg: ValidateConfig, gx_root: Path
) -> ValidationReport:
    """Run the suite on every split, write Data Docs under `gx_root`, return the report."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no phone-home from a closed network
    import great_expectations as gx

    gx_root.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(gx_root))
    source = ctx.data_sources.add_or_update_pandas(f"{ds.name}-samples")
    evaluated, failed, definitions, frames = 0, [], [], {}
    for split in SPLITS:
        asset = source.get_asset(split) if split in source.get_asset_names() else None
        asset = asset or source.add_dataframe_asset(name=split)
        batch = next(
            (b for b in asset.batch_definitions if b.name == "all"), None
        ) or asset.add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add_or_update(
            build_suite(f"{ds.name}-{split}", split, ds, declared, cfg)
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
                evaluated += 1
                if not r.success:
                    failed.append(
                        {
                            "split": split,
                            "name": r.expectation_config.meta.get(
                                "name", r.expectation_config.type
                            ),
                            "observed": _observed(r.result),
                        }
                    )
    docs = gx_root / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    return ValidationReport(not failed, evaluated, failed, str(docs))


def _observed(result: dict) -> str:
    if "observed_value" in result:
        return str(result["observed_value"])
    if "unexpected_count" in result:
        sample = result.get("partial_unexpected_list", [])[:5]
        return f"{result['unexpected_count']} bad rows, e.g. {sample}"
    return str(result) or "exception while evaluating"
