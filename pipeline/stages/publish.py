"""data pull / the publish DAG: write a dataset version from its source and record it with DVC."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.settings import Settings


def publish_stage(cfg: Config, settings: Settings, rewrite: bool = False, log=print) -> dict:
    """Make data/ hold `cfg.base.dataset` as its source and `cfg.data` make it, tracked by
    data.dvc and pushed: {"dataset", "data_md5", "previous", "pointer"} ("previous": the md5
    data.dvc held before, equal to data_md5 when the source and settings had not changed;
    "pointer": data.dvc's entry, which another host checks the version out by). `rewrite` writes
    data/ even then. Raises DataError for a missing or unreadable source."""
    from pipeline.data import materialize
    from pipeline.data.versioning import POINTER, pointer, recorded_md5

    before = recorded_md5(settings.root) if (settings.root / POINTER).exists() else None
    md5 = materialize(
        cfg.base.dataset, settings.root, settings.data_dir, cfg.data, log=log, rewrite=rewrite
    )
    entry = pointer(settings.root)
    return {"dataset": cfg.base.dataset, "data_md5": md5, "previous": before, "pointer": entry}
