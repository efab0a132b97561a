"""lr-find: the learning-rate range test on validated, tracked data, as an MLflow run of its own
(the loss-vs-lr plot, the curve, the suggestion). `train.optimizer.lr: auto` runs it first and
trains with the suggestion, which the training run then records as its lr param."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.context import RunContext
from pipeline.data import check_validated, read_dataset
from pipeline.settings import Settings

IDENTITY_TAG = "lr_find.identity"


def lr_find_stage(
    cfg: Config,
    settings: Settings,
    validation: dict,
    ctx: RunContext | None = None,
    identity: str | None = None,
) -> dict:
    """Run the range test, or return the finished one of the same `identity` (a retried task
    or a resumed training finds the lr it used before). Returns {"run_id", "suggested_lr",
    "method", "reused", ...}; raises DataError for untracked or unvalidated data."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking import store
    from pipeline.training.lr_finder import plot, range_test

    data = check_validated(cfg.base.dataset, settings.root, settings.data_dir, validation)
    experiment = store.configure(settings, cfg.tracking.experiment)
    if identity:
        found = MlflowClient().search_runs(
            [experiment],
            f"tags.`{IDENTITY_TAG}` = '{identity}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        if found:
            run = found[0]
            return {
                "run_id": run.info.run_id,
                "suggested_lr": run.data.metrics["suggested_lr"],
                "method": run.data.tags["lr_find.method"],
                "reused": True,
            }
    ds = read_dataset(settings.data_dir, mmap=True)
    test = range_test(cfg.train, ds.train, ds.classes, cfg.base.seed)
    t = cfg.train
    tags = {
        "lr_find.method": test.method,
        "data.md5": data["data_md5"],
        "data.dataset": ds.name,
        "params.hash": cfg.params_hash(),
        **({IDENTITY_TAG: identity} if identity else {}),
    }
    name = f"lr-find-{ds.name}-{t.model.name}-{t.optimizer.name}"
    new = store.new_run(settings, cfg.tracking.experiment, ctx or RunContext(), name, tags)
    with mlflow.start_run(run_id=new) as run:
        mlflow.log_params(
            {
                "train.model.name": t.model.name,
                "train.optimizer.name": t.optimizer.name,
                "train.batch_size": t.batch_size,
                "steps": len(test.lrs),
            }
        )
        curve = zip(test.lrs, test.losses, test.smoothed, strict=True)
        for step, (lr, loss, smooth) in enumerate(curve):
            mlflow.log_metrics({"lr": lr, "loss": loss, "smoothed_loss": smooth}, step=step)
        mlflow.log_metric("suggested_lr", test.suggestion)
        curves = {"lrs": test.lrs, "losses": test.losses, "smoothed": test.smoothed}
        mlflow.log_dict({**curves, **test.to_dict()}, "lr_find.json")
        plot_dir = settings.outputs / "plots"
        plot_dir.mkdir(parents=True, exist_ok=True)
        mlflow.log_artifact(str(plot(test, plot_dir / "lr_find.png")), "plots")
    return {"run_id": run.info.run_id, **test.to_dict(), "reused": False}
