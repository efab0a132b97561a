"""`pipeline` command line: one subcommand per stage, plus data, status and summary."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config, parse_overrides
from pipeline.data import DataError
from pipeline.settings import Settings

MLFLOW_UI_HINT = "make mlflow-ui   (or: .venv/bin/mlflow ui --backend-store-uri {uri})"
LOCAL_COMMANDS = {"data", "check-data"}  # everything else talks to MLflow


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", type=Path, help="params file (default: params.yaml in the project)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. --set train.optimizer.name=adam (repeatable)",
    )
    parser.add_argument("--preset", help="a recipe from params.yaml `presets:` (base.preset)")


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise DataError(f"{path} not found; run `pipeline {what}` first")
    return json.loads(path.read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="materialize and version a dataset")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    pull = data_sub.add_parser("pull", help="write the dataset to data/, dvc add + push it")
    _common(pull)
    pull.add_argument("--dataset", help="digits | mnist | fashion_mnist | cifar10 | imagefolder")
    pull.add_argument("--source-dir", type=Path, help="raw files / class folders (data.source_dir)")

    for name, text in (
        ("check-data", "check data/ is present and matches data.dvc"),
        ("validate", "run the Great Expectations suite; write Data Docs"),
    ):
        _common(sub.add_parser(name, help=text))
    train = sub.add_parser("train", help="train on validated data; log to MLflow")
    _common(train)
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run of these params and data from its last checkpoint",
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (torchrun; one per GPU, gloo on CPU)",
    )
    for name, text in (
        ("evaluate", "score the trained model on the test split"),
        ("register", "register the model; promote it if it passes the gate"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--run-id", help="MLflow run (default: the one in outputs/train.json)")

    ref_help = "NAME/VERSION, NAME@ALIAS, or NAME for its champion (e.g. image-classifier/3)"
    lineage = sub.add_parser("lineage", help="what data, code, params and run made a model")
    lineage.add_argument("model", help=ref_help)
    reproduce = sub.add_parser(
        "reproduce", help="retrain a registered model from its lineage; compare the metrics"
    )
    reproduce.add_argument("model", help=ref_help)
    reproduce.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="largest metric difference that still counts as reproduced (default 0: exact)",
    )

    promote = sub.add_parser(
        "promote", help="make a version champion (the promotion policy, unless --force)"
    )
    _common(promote)
    promote.add_argument("model", help="NAME/VERSION (e.g. image-classifier/3)")
    promote.add_argument("--reason", help="why; recorded in the alias history")
    promote.add_argument("--force", action="store_true", help="skip the policy (needs --reason)")
    rollback = sub.add_parser("rollback", help="champion <- previous-champion, recorded")
    _common(rollback)
    rollback.add_argument("model", help="registered model name")
    rollback.add_argument("--reason", default="manual rollback", help="recorded in the history")
    history = sub.add_parser("history", help="which version held which alias when, and why")
    history.add_argument("model", help="registered model name")
    history.add_argument("--json", action="store_true", help="machine-readable output")
    predict = sub.add_parser("predict", help="score images with a registered model")
    predict.add_argument("--model", default="image-classifier@champion", help=ref_help)
    predict.add_argument(
        "--input", type=Path, required=True, help="a folder of images or an .npy file"
    )
    predict.add_argument(
        "--output", type=Path, default=Path("predictions.csv"), help=".csv or .json"
    )

    status = sub.add_parser("status", help="registered models, versions, aliases, metrics")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("summary", help="what the latest run produced (used by `make run`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # stdout is the command's JSON result: no download bars, no "View run at" lines in it.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    settings = Settings.from_env()
    try:
        if args.command not in LOCAL_COMMANDS:
            from pipeline.registry import wait_for_server

            wait_for_server(settings)
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return 1
    except LookupError as exc:  # a model reference that does not resolve
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        message = _known_failure(exc, settings)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1


def _known_failure(exc: Exception, settings: Settings) -> str | None:
    """One line (or a report already printed) for failures that have a known cause and fix."""
    from pipeline.registry import RegistryUnavailable

    if isinstance(exc, RegistryUnavailable):  # before importing torch: said without delay
        return f"error: {exc}"
    from pipeline.checkpoint import CheckpointError
    from pipeline.train import TrainingDiverged
    from pipeline.validate import ValidationFailed

    if isinstance(exc, ValidationFailed):  # the stage printed the full report already
        return "error: validation failed; this data version must not be trained on"
    if isinstance(exc, TrainingDiverged | CheckpointError):
        return f"error: {exc}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return (
            f"error: disk full{where}; nothing half-written was kept. Free space on that disk "
            "and run the command again"
        )
    store_error = _store_error(exc)
    if store_error:
        return (
            f"error: the MLflow store at {settings.tracking_uri} cannot be read ({store_error}); "
            "restore it from a backup, or move it aside to start an empty store"
        )
    return None


def _store_error(exc: BaseException) -> str | None:
    """The database error behind an MLflow failure (a corrupt or foreign mlflow.db), if any."""
    from sqlalchemy.exc import DatabaseError

    while exc is not None:
        if isinstance(exc, DatabaseError):
            return str(exc.orig or exc).splitlines()[0]
        exc = exc.__cause__ or exc.__context__
    return None


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline import stages

    if args.command == "status":
        return _status(settings, args.json)
    if args.command == "summary":
        return _summary(settings)
    if args.command == "lineage":
        return _lineage(settings, args.model)
    if args.command == "history":
        return _history(settings, args.model, args.json)
    if args.command == "predict":
        from pipeline.predict import predict_stage
        from pipeline.registry import reachable

        with reachable(settings):
            result = predict_stage(_client(settings), args.model, args.input, args.output)
        print(json.dumps(result, indent=2))
        return 0
    if args.command == "reproduce":
        from pipeline.reproduce import describe, reproduce

        report = reproduce(settings, args.model, args.tolerance)
        print(describe(report))
        return 0 if report["reproduced"] else 1
    overrides = parse_overrides(args.overrides)
    if getattr(args, "preset", None):
        overrides["base.preset"] = args.preset
    if getattr(args, "dataset", None):
        overrides["base.dataset"] = args.dataset
    if getattr(args, "source_dir", None):
        overrides["data.source_dir"] = str(args.source_dir.resolve())
    cfg = load_config(args.params or settings.params, overrides)

    if args.command == "data":
        from pipeline.data import materialize

        source = Path(cfg.data.source_dir) if cfg.data.source_dir else None
        md5 = materialize(
            cfg.base.dataset,
            settings.root,
            settings.data_dir,
            source,
            cfg.data.download,
            cfg.data.test_fraction,
            cfg.data.image_size,
        )
        print(json.dumps({"dataset": cfg.base.dataset, "data_md5": md5}))
        return 0
    if args.command == "promote":
        result = stages.promote_stage(cfg, settings, args.model, args.reason, args.force)
    elif args.command == "rollback":
        result = _rollback(cfg, settings, args.model, args.reason)
    elif args.command == "check-data":
        result = stages.check_data_stage(cfg, settings)
    elif args.command == "validate":
        result = stages.validate_stage(cfg, settings)
    elif args.command == "train":
        if args.nproc > 1:
            from pipeline.distributed import launch

            return launch(args.nproc, _train_argv(args))
        validation = _read_json(settings.outputs / "validation.json", "validate")
        result = stages.train_stage(cfg, settings, validation, resume=args.resume)
        if not result:
            return 0  # a torchrun worker: rank 0 reports
    else:
        run_id = args.run_id or _read_json(settings.outputs / "train.json", "train")["run_id"]
        stage = stages.evaluate_stage if args.command == "evaluate" else stages.register_stage
        result = stage(cfg, settings, run_id)
    print(json.dumps(result, indent=2, default=str))
    return 0


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


def _client(settings: Settings):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(settings.tracking_uri)
    return MlflowClient()


def _lineage(settings: Settings, ref: str) -> int:
    """The model version, its run and scores, then the lineage record its run logged."""
    from pipeline import lineage, registry

    client = _client(settings)
    version = registry.resolve(client, ref)
    with registry.run_artifacts(version.run_id, "record"):
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
    print(json.dumps({"model": model, **lineage.of_run(version.run_id)}, indent=2))
    return 0


def _rollback(cfg, settings: Settings, name: str, reason: str) -> dict:
    from pipeline import promotion, registry

    with registry.reachable(settings), registry.promotion_lock(settings, name):
        client = _client(settings)
        registry.registered_model(client, name)
        old, new = promotion.rollback(client, name, reason, promotion.actor())
    return {"model_name": name, "champion": new, "previous-champion": old, "reason": reason}


def _history(settings: Settings, name: str, as_json: bool) -> int:
    from pipeline import promotion, registry

    with registry.reachable(settings):
        client = _client(settings)
        registry.registered_model(client, name)
        events = promotion.history(client, name)
    if as_json:
        print(json.dumps(events, indent=2))
        return 0
    if not events:
        print(f"no alias moves recorded for {name}")
    for e in events:
        was = f"(was v{e['previous']})" if e["previous"] else "(new)"
        print(f"{e['at']}  {e['alias']:<17} v{e['version']:<4}{was:<10} {e['by']}: {e['reason']}")
    return 0


def _status(settings: Settings, as_json: bool) -> int:
    from pipeline.registry import model_status

    models = model_status(_client(settings))
    if as_json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("no registered models yet; run `make run`")
    for model in models:
        print(model["name"])
        for v in reversed(model["versions"]):
            acc = "-" if v["test_accuracy"] is None else f"{v['test_accuracy']:.4f}"
            aliases = ",".join(v["aliases"]) or "-"
            if v["status"] != "complete":
                aliases = f"{aliases} ({v['status']})"
            print(
                f"  v{v['version']:<3} {aliases:<30} test_accuracy {acc}  "
                f"data {v['dataset']}@{v['data_md5']}  run {v['run_id']}"
            )
    return 0


def _summary(settings: Settings) -> int:
    """The latest run's data version, validation, accuracy, and its registered version."""
    from pipeline.registry import model_status

    client = _client(settings)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        order_by=["start_time DESC"],
        max_results=1,
    )
    if not runs:
        print("no runs yet; run `make run`")
        return 1
    run = runs[0]
    tags, metrics = run.data.tags, run.data.metrics
    if tags.get("pipeline.skipped") == "true":
        print("\n=== pipeline run summary ===")
        print(f"run            {run.info.run_name} ({run.info.run_id}): nothing trained")
        print(f"reason         {tags.get('skip.reason')}")
        print("retrain        trigger the DAG with force_retrain=true")
        return 0
    registered = [
        (m["name"], v)
        for m in model_status(client)
        for v in m["versions"]
        if v["run_id"] == run.info.run_id
    ]
    print("\n=== pipeline run summary ===")
    print(f"run            {run.info.run_name} ({run.info.run_id}, {run.info.status})")
    print(f"data version   {tags.get('data.dataset')} md5 {tags.get('data.md5')}")
    print(
        f"validation     {'passed' if tags.get('validation.success') == 'true' else 'FAILED'} "
        f"({tags.get('validation.evaluated')} expectations)"
    )
    print(
        f"test accuracy  {metrics.get('test_accuracy', float('nan')):.4f}"
        f"   macro-F1 {metrics.get('test_macro_f1', float('nan')):.4f}"
    )
    for name, v in registered:
        aliases = ", ".join(v["aliases"]) or "-"
        print(f"registered     {name} version {v['version']} aliases: {aliases}")
    if not registered:
        print("registered     (not registered)")
    print(f"MLflow UI      {MLFLOW_UI_HINT.format(uri=settings.tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
