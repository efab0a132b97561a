"""Train an image classifier: check_data -> validate -> skip_if_unchanged -> train -> evaluate
-> explain -> register -> compress (when params.yaml's compress.methods asks for it).

Wiring only: the stages are declared in `pipeline.stages.graph` and imported inside the task bodies,
so parsing this file never imports torch, MLflow or Great Expectations. Tasks hand each other
small JSON (resolved config, data md5, MLflow run id), so each may run on a different worker.
"""

from __future__ import annotations

import os

import dag_support as ds
import pendulum
from airflow.sdk import (
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    dag,
    get_current_context,
    task,
)

SCHEDULE = os.environ.get("PIPELINE_SCHEDULE", "@weekly")  # "none": new data and triggers only

# Form field -> params.yaml key. The fields start empty: an empty one keeps params.yaml's value
# (after the preset's), and a value typed in wins whatever it is, even params.yaml's own.
PARAM_KEYS = {
    "preset": "base.preset",
    "dataset": "base.dataset",
    "model": "train.model.name",
    "optimizer": "train.optimizer.name",
    "lr": "train.optimizer.lr",
    "schedule": "train.schedule.name",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
}
PARAMS = ds.params_yaml()
EMPTY = {name: ds.empty_note(PARAMS, key) for name, key in PARAM_KEYS.items()}


@dag(
    dag_id="train_image_classifier",
    description="DVC data -> GX validation -> PyTorch training -> evaluation -> MLflow registry",
    schedule=[ds.DATA]
    if SCHEDULE.lower() == "none"
    else AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(SCHEDULE, timezone="UTC"), assets=[ds.DATA]
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "training", "mlflow"],
    default_args=ds.default_args(),
    doc_md=__doc__,
    params={
        "preset": ds.preset_param(PARAMS, ds.param(PARAMS, "base.preset")),
        "dataset": ds.choice(
            "base.dataset",
            None,
            description=f"must match the data version in data.dvc; {EMPTY['dataset']}",
        ),
        "model": ds.choice("train.model.name", None, description=EMPTY["model"]),
        "optimizer": ds.choice("train.optimizer.name", None, description=EMPTY["optimizer"]),
        # Two types: Airflow's form then shows a free field (a number field refuses "auto").
        "lr": ds.form_param(
            None,
            type=["number", "string"],
            anyOf=[{"type": "number", "exclusiveMinimum": 0}, {"const": "auto"}],
            description=f"a number, or auto: the learning-rate range test picks it; {EMPTY['lr']}",
        ),
        "schedule": ds.choice("train.schedule.name", None, description=EMPTY["schedule"]),
        "epochs": ds.form_param(None, type="integer", minimum=1, description=EMPTY["epochs"]),
        "batch_size": ds.form_param(
            None, type="integer", minimum=1, description=EMPTY["batch_size"]
        ),
        "nodes": Param(
            1,
            type="integer",
            minimum=1,
            description="machines to train on, each a worker of the training queue "
            "(infra/README.md, Training on several machines)",
        ),
        "nproc_per_node": Param(
            1, type="integer", minimum=1, description="training processes per machine (GPUs)"
        ),
        "force_retrain": Param(
            False,
            type="boolean",
            description="retrain even when data, params and code equal the champion's",
        ),
    },
)
def train_image_classifier():
    @task(inlets=[ds.DATA])
    def check_data() -> dict:
        """Resolve params.yaml + run params; pin the data version (the publishing event's, else
        data.dvc's) that every task of this run checks out, on whatever worker it runs."""
        from pipeline.stages.validate import check_data_stage

        cfg = ds.form_config(PARAM_KEYS)
        pinned = ds.pinned_data()
        with ds.permanent_errors():
            data = check_data_stage(cfg, ds.settings())
        nodes = ds.training_nodes(cfg)
        return {"config": cfg.to_dict(), **data, "pinned": pinned, "nodes": nodes}

    @ds.stage_task()
    def validate(cfg, settings, ctx) -> dict:
        """Great Expectations suite per split; a failure stops the run before training."""
        from pipeline.stages import graph

        return graph.run("validate", cfg, settings, {}, ctx)

    @ds.stage_task()
    def skip_if_unchanged(cfg, settings, ctx, validation: dict) -> dict:
        """Same data, params and code as the champion: record a skipped run, train nothing."""
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline.stages.skip import record_skip, unchanged_stage

        decision = unchanged_stage(cfg, settings, validation["data_md5"])
        if decision["unchanged"] and not get_current_context()["params"].get("force_retrain"):
            record_skip(cfg, settings, decision, ctx)
            raise AirflowSkipException(
                f"skipped: {decision['reason']}; trigger with force_retrain=true to retrain"
            )
        return decision

    @ds.stage_task(**ds.GPU_TASK)
    def train(cfg, settings, ctx, validation: dict, _decision: dict, nodes: dict) -> dict:
        """Train on the validated data version, logging to MLflow with lineage tags; on several
        machines (`nodes`), this task is the first and opens their rendezvous.

        A retry resumes from this DAG run's last epoch checkpoint, into the same MLflow run."""
        from pipeline.stages import graph

        ctx = ctx.with_(resume=True)
        if nodes["nnodes"] * nodes["nproc"] == 1:
            return graph.run("train", cfg, settings, {"validate": validation}, ctx)
        return ds.lead_training(cfg, settings, ctx, validation, nodes)

    @task
    def peer_nodes(nodes: dict) -> list[int]:
        """The machines after the first of a training on several: one train_peer each."""
        return list(range(1, nodes["nnodes"]))

    @ds.stage_task(**ds.GPU_TASK)
    def train_peer(cfg, settings, ctx, validation: dict, nodes: dict, node: int) -> dict:
        """Machine `node` (1..nodes-1) of a training on several machines: joins the rendezvous
        the train task opened (none: a run on one machine maps no peer)."""
        return ds.join_training(cfg, settings, validation, nodes, node)

    @ds.stage_task()
    def evaluate(cfg, settings, ctx, trained: dict) -> dict:
        """Test-split metrics, confusion matrix and learning curves into the same MLflow run."""
        from pipeline.stages import graph

        return graph.run("evaluate", cfg, settings, {"train": trained}, ctx)

    @ds.stage_task()
    def explain(cfg, settings, ctx, trained: dict, evaluated: dict) -> dict:
        """Attributions for sampled test images and the worst mistakes, into the same run."""
        from pipeline.stages import graph

        inputs = {"train": trained, "evaluate": evaluated}
        return graph.run("explain", cfg, settings, inputs, ctx)

    @ds.stage_task(pool=ds.PROMOTION_POOL)
    def register(cfg, settings, ctx, trained: dict, evaluated: dict, _explained: dict) -> dict:
        """Register a version (idempotent), alias challenger, let the policy decide on champion.

        The one-slot pool serializes promotions across DAG runs and workers; MLflow being
        unreachable is retried (it fails the task only after the retries)."""
        from pipeline.stages import graph

        inputs = {"train": trained, "evaluate": evaluated}
        return graph.run("register", cfg, settings, inputs, ctx)

    @ds.stage_task(**ds.GPU_TASK)
    def compress(cfg, settings, ctx, validation: dict, trained: dict, registered: dict) -> dict:
        """Distill, prune or quantize the new model into smaller challengers, each registered
        through the promotion policy (compress.methods; [] = nothing, in seconds)."""
        from pipeline.stages import graph

        inputs = {"validate": validation, "train": trained, "register": registered}
        return graph.run("compress", cfg, settings, inputs, ctx.with_(resume=True))

    checked = check_data()
    validation = validate(checked)
    decision = skip_if_unchanged(checked, validation)
    trained = train(checked, validation, decision, checked["nodes"])
    peers = train_peer.partial(checked=checked, validation=validation, nodes=checked["nodes"])
    peers.expand(node=decision >> peer_nodes(checked["nodes"]))
    evaluated = evaluate(checked, trained)
    registered = register(checked, trained, evaluated, explain(checked, trained, evaluated))
    compress(checked, validation, trained, registered)


train_image_classifier()
