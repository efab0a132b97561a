"""One handler per subcommand: `(args, settings) -> exit code`. Each calls a stage or a registry
function and prints its result (JSON, or the tables of `display`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from pipeline.cli import display
from pipeline.config import Config, load_config, parse_overrides
from pipeline.context import RunContext
from pipeline.errors import ConfigError, OutOfOrder
from pipeline.settings import Settings
from pipeline.stages import graph

LOCAL_COMMANDS = {"data", "check-data", "choices"}  # everything else talks to MLflow
PROJECTLESS = {"choices"}  # the others need params.yaml or a registry


def _config(args: argparse.Namespace, settings: Settings) -> Config:
    """params.yaml (or --params) with --preset, --dataset, --source-dir and --set applied."""
    overrides = parse_overrides(args.overrides)
    if getattr(args, "preset", None):
        overrides["base.preset"] = args.preset
    if getattr(args, "dataset", None):
        overrides["base.dataset"] = args.dataset
    if getattr(args, "source_dir", None):
        overrides["data.source_dir"] = str(args.source_dir.resolve())
    return load_config(args.params or settings.params, overrides)


def _handoff(settings: Settings, stage: str, missing: dict | None = None) -> dict:
    """What stage `stage` handed on (its `hands_on` file); `missing` when it has not run here,
    or OutOfOrder when none is given."""
    path = settings.handoff(graph.BY_NAME[stage].hands_on)
    if not path.exists() and missing is not None:
        return missing
    if not path.exists():
        raise OutOfOrder(f"{path} not found; run `pipeline {stage}` first")
    return json.loads(path.read_text())


def _context(**fields) -> RunContext:
    """The call's context; in a `dvc exp run` DVC names the experiment and its baseline commit
    in the environment, and the runs, versions and alias moves record both."""
    name = os.environ.get("DVC_EXP_NAME")
    if not name:
        return RunContext(**fields)
    ids = {"experiment": name, "baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", "")}
    return RunContext(origin="dvc", ids=ids, **fields)


def _print(result: dict) -> int:
    print(json.dumps(result, indent=2, default=str))
    return 0


def data(args, settings: Settings) -> int:
    from pipeline.stages.publish import publish_stage

    result = publish_stage(_config(args, settings), settings, rewrite=args.rewrite)
    print(json.dumps({k: result[k] for k in ("dataset", "data_md5")}))
    return 0


def check_data(args, settings: Settings) -> int:
    from pipeline.stages.validate import check_data_stage

    return _print(check_data_stage(_config(args, settings), settings))


def stage(args, settings: Settings) -> int:
    """A stage of the graph (validate, train, evaluate, ...): its inputs are the hand-offs in
    the workspace (or the run of --run-id, the model of --model), its result is printed and
    handed on."""
    cfg = _config(args, settings)
    if args.command == "train" and "RANK" not in os.environ:
        nodes = _nodes(args, cfg)
        if nodes is not None:
            from pipeline.training.distributed import launch

            code = launch(nodes, "pipeline.cli", _train_argv(args))
            if code and nodes.nnodes > 1:
                print(
                    f"error: {nodes.failure(code)}. Run the same command on every machine, with "
                    "the same --rdzv-id, and an endpoint every machine reaches "
                    "(docs/training.md, Several machines)",
                    file=sys.stderr,
                )
            return code
    needs = graph.BY_NAME[args.command].needs
    if getattr(args, "model", None):
        inputs = {need: {"model": args.model} for need in needs}
    elif getattr(args, "run_id", None):
        inputs = {need: {"run_id": args.run_id} for need in needs}
    elif "RANK" in os.environ:  # under torchrun: the machine that holds them shares them
        inputs = {need: _handoff(settings, need, missing={}) for need in needs}
    else:
        inputs = {need: _handoff(settings, need) for need in needs}
    ctx = _context(resume=getattr(args, "resume", False))
    result = graph.run(args.command, cfg, settings, inputs, ctx)
    return _print(result) if result else 0  # {}: a torchrun worker; rank 0 reports


def lr_find(args, settings: Settings) -> int:
    from pipeline.stages.lr_find import lr_find_stage

    validation = _handoff(settings, "validate")
    return _print(lr_find_stage(_config(args, settings), settings, validation))


def _nodes(args: argparse.Namespace, cfg):
    """Where `pipeline train --nproc/--nnodes` runs (None: in this process); ConfigError for
    what torchrun cannot."""
    from pipeline.stages.nodes import require_distributable
    from pipeline.training.distributed import Nodes

    if args.nproc < 1 or args.nnodes < 1 or args.join_timeout < 1:
        raise ConfigError("--nproc, --nnodes and --join-timeout are at least 1")
    if args.nnodes == 1 and (args.rdzv_endpoint or args.rdzv_id):
        raise ConfigError(
            "--rdzv-endpoint and --rdzv-id name a rendezvous of several machines: give --nnodes too"
        )
    if args.nproc == 1 and args.nnodes == 1:
        return None
    require_distributable(cfg)  # before torchrun starts its processes
    if args.nnodes > 1 and not (args.rdzv_endpoint and args.rdzv_id):
        raise ConfigError(
            f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (on one of the machines, "
            "reachable from all) and --rdzv-id (the same on every machine of this training)"
        )
    return Nodes(args.nproc, args.nnodes, args.rdzv_endpoint, args.rdzv_id, args.join_timeout)


def _train_argv(args: argparse.Namespace) -> list[str]:
    """The same `pipeline train` command, for each torchrun process."""
    argv = ["train"]
    if args.params:
        argv += ["--params", str(args.params.resolve())]
    if args.preset:
        argv += ["--preset", args.preset]
    for pair in args.overrides:
        argv += ["--set", pair]
    return argv + (["--resume"] if args.resume else [])


def promote(args, settings: Settings) -> int:
    from pipeline.stages.register import promote_stage

    cfg = _config(args, settings)
    return _print(promote_stage(cfg, settings, args.model, args.reason, args.force))


def rollback(args, settings: Settings) -> int:
    from pipeline.stages.register import rollback_stage

    return _print(rollback_stage(settings, args.model, args.reason))


def predict(args, settings: Settings) -> int:
    from pipeline.config import MonitorConfig
    from pipeline.stages.predict import predict_stage

    exists = settings.params.exists()  # outside a project: the defaults
    monitor = load_config(settings.params).monitor if exists else MonitorConfig()
    return _print(predict_stage(settings, args.model, args.input, args.output, monitor))


def _webhook(settings: Settings, url: str, name: str, alias: str) -> None:
    from pipeline.serving import webhook
    from pipeline.tracking import server, store

    with server.reachable(settings):
        webhook.register(store.client(settings), url, name, alias, webhook.secret())


def serve(args, settings: Settings) -> int:
    from pipeline.serving.app import Job, run
    from pipeline.serving.model import where

    if args.workers is not None:  # checked as the param is
        args.overrides = [*(args.overrides or []), f"serve.workers={args.workers}"]
    cfg = _config(args, settings)
    name, _, alias = args.model.removeprefix("models:/").partition("@")  # MLflow's URI form too
    if "/" in name or "@" in alias or "/" in alias or args.model.endswith("@"):
        raise ConfigError(
            f"--model {args.model}: give NAME@ALIAS (or NAME for its champion), which the server "
            "follows; to serve one version, give it an alias of its own in the registry"
        )
    alias = alias or "champion"
    if args.shadow and (args.shadow == alias or not re.fullmatch(r"[\w-]+", args.shadow)):
        raise ConfigError(
            f"--shadow {args.shadow}: give another alias of {name} than the one served "
            "(e.g. challenger); it may point nowhere yet"
        )
    where(settings, name, alias)  # one line, before the port opens, when it points nowhere
    if args.webhook_url:
        for followed in filter(None, (alias, args.shadow)):
            _webhook(settings, args.webhook_url, name, followed)
    job = Job(settings, cfg.serve, (name, alias), args.shadow, cfg.monitor)
    return run(job, (args.host, args.port))


def reproduce(args, settings: Settings) -> int:
    from pipeline.stages.reproduce import describe, reproduce

    report = reproduce(settings, args.model, args.tolerance)
    print(describe(report))
    return 0 if report["reproduced"] else 1


def lineage(args, settings: Settings) -> int:
    """The model version, its run and scores, then the lineage record its run logged."""
    from pipeline.registry import versions
    from pipeline.tracking import lineage, store

    client = store.client(settings)
    version = versions.resolve(client, args.model)
    with store.run_artifacts(version.run_id, "record"):
        run = client.get_run(version.run_id)
    aliases = client.get_registered_model(version.name).aliases or {}
    model = {
        "name": version.name,
        "version": int(version.version),
        "aliases": sorted(a for a, v in aliases.items() if str(v) == str(version.version)),
        "run_id": version.run_id,
        "model_uri": run.data.tags.get("model_uri"),
        "metrics": {k: run.data.metrics.get(k) for k in ("test_accuracy", "test_macro_f1")},
        "promotion": version.tags.get("promotion.decision"),
    }
    return _print({"model": model, **lineage.of_run(version.run_id)})


def history(args, settings: Settings) -> int:
    from pipeline.registry import promotion, versions
    from pipeline.tracking import server, store

    with server.reachable(settings):
        client = store.client(settings)
        versions.registered_model(client, args.model)
        events = promotion.history(client, args.model)
    if args.json:
        return _print(events)
    print(display.history(args.model, events))
    return 0


def status(args, settings: Settings) -> int:
    from pipeline.registry.versions import model_status
    from pipeline.tracking import orphans, store

    if args.running:
        runs = orphans.running(store.client(settings))
        if args.json:
            print(json.dumps(runs, indent=2))
            return 0
        print(display.running(runs))
        return 0
    models = model_status(store.client(settings))
    if args.json:
        return _print(models)
    print(display.status(models))
    return 0


def summary(args, settings: Settings) -> int:
    """The latest run's data version, validation, accuracy, and its registered version."""
    from pipeline.registry.versions import model_status
    from pipeline.tracking import store

    client = store.client(settings)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        order_by=["start_time DESC"],
        max_results=1,
    )
    if not runs:
        print("no runs yet; run `make run`")
        return 1
    run = runs[0]
    registered = [
        (m["name"], v)
        for m in model_status(client)
        for v in m["versions"]
        if v["run_id"] == run.info.run_id
    ]
    print(display.summary(run, registered, settings.tracking_uri))
    return 0


def list_choices(args, settings: Settings) -> int:
    """Every pluggable choice by params.yaml key, with its one-line help (pipeline/choices.py)."""
    from pipeline import choices

    width = 2 + max(len(name) for table in choices.KEYS.values() for name in table)
    for key, table in choices.KEYS.items():
        print(f"{key}:")
        print("\n".join(f"  {c.name:<{width}}{c.help}" for c in table.values()))
    return 0


HANDLERS = {
    "data": data,
    "check-data": check_data,
    **{s.name: stage for s in graph.STAGES},
    "lr-find": lr_find,
    "promote": promote,
    "rollback": rollback,
    "predict": predict,
    "serve": serve,
    "reproduce": reproduce,
    "lineage": lineage,
    "history": history,
    "status": status,
    "summary": summary,
    "choices": list_choices,
}
