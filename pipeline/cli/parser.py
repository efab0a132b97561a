"""The `pipeline` command line's arguments: one subcommand per stage, plus data, the registry
commands, status and summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import choices
from pipeline.stages import graph


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="train, register and serve image classifiers"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _stage_commands(sub)
    _model_commands(sub)
    status = sub.add_parser("status", help="registered models, versions, aliases, metrics")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--running",
        action="store_true",
        help="the MLflow runs still RUNNING, with their process and whether it lives",
    )
    sub.add_parser("summary", help="what the latest run produced (used by `make run`)")
    sub.add_parser("choices", help="the datasets, models, optimizers, schedules, sweep strategies")
    return parser


def _stage_commands(sub) -> None:
    """data pull and the stages of dvc.yaml, each taking --params / --set / --preset."""
    data = sub.add_parser("data", help="materialize and version a dataset")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    pull = data_sub.add_parser("pull", help="write the dataset to data/, dvc add + push it")
    _common(pull)
    pull.add_argument("--dataset", choices=choices.names(choices.DATASETS), help="base.dataset")
    pull.add_argument("--source-dir", type=Path, help="raw files / class folders (data.source_dir)")
    pull.add_argument(
        "--rewrite",
        action="store_true",
        help="write data/ from the source even when the tracked version was made from the same "
        "content and settings",
    )

    _common(sub.add_parser("check-data", help="check data/ is present and matches data.dvc"))
    for stage in graph.STAGES:
        parser = sub.add_parser(stage.name, help=stage.help)
        _common(parser)
        STAGE_OPTIONS.get(stage.name, lambda _: None)(parser)
    _common(sub.add_parser("lr-find", help="learning-rate range test; suggests train.optimizer.lr"))


def _train_options(train: argparse.ArgumentParser) -> None:
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
    nodes = train.add_argument_group(
        "several machines", "run the same command on each; they meet at torchrun's rendezvous"
    )
    nodes.add_argument("--nnodes", type=int, default=1, help="machines in the training")
    nodes.add_argument("--rdzv-endpoint", default="", help="HOST:PORT on one of the machines")
    nodes.add_argument("--rdzv-id", default="", help="the same id on every machine of one run")
    nodes.add_argument(
        "--join-timeout",
        type=int,
        default=600,
        help="seconds to wait for every machine to join (then a clear failure)",
    )


def _run_id_option(parser) -> None:
    parser.add_argument("--run-id", help="MLflow run (default: the one in outputs/train.json)")


# The options a stage takes beyond --params / --set / --preset.
def _compress_options(compress: argparse.ArgumentParser) -> None:
    compress.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished results of the same teacher, method settings and data, and "
        "continue an interrupted distillation or fine-tuning from its checkpoint",
    )


def _explain_options(explain: argparse.ArgumentParser) -> None:
    which = explain.add_mutually_exclusive_group()
    _run_id_option(which)
    which.add_argument(
        "--model",
        help="a registered model instead: NAME/VERSION or NAME@ALIAS (its card is rewritten)",
    )


STAGE_OPTIONS = {
    "train": _train_options,
    "evaluate": _run_id_option,
    "explain": _explain_options,
    "register": _run_id_option,
    "compress": _compress_options,
}


def _model_commands(sub) -> None:
    """What works on registered models: lineage, reproduce, promote, rollback, history, predict."""
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
    serve = sub.add_parser(
        "serve", help="an HTTP server for a model's alias that follows it (docs/serving.md)"
    )
    _common(serve)
    serve.add_argument(
        "--model",
        default="image-classifier@champion",
        help="NAME@ALIAS, or NAME for its champion; the server follows the alias",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--webhook-url",
        help="this server's /webhook as the MLflow tracking server reaches it: registers a "
        "registry webhook (secret: PIPELINE_SERVE_WEBHOOK_SECRET) so alias moves arrive at once",
    )
    serve.add_argument(
        "--shadow",
        metavar="ALIAS",
        default="",
        help="another alias of the model (e.g. challenger) that scores each request too, off "
        "the response path; agreement with the answers is a metric",
    )
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes on the one port (serve.workers; default 1), each with its own "
        "model and batcher",
    )
    predict = sub.add_parser("predict", help="score images with a registered model")
    predict.add_argument("--model", default="image-classifier@champion", help=ref_help)
    predict.add_argument(
        "--input", type=Path, required=True, help="a folder of images or an .npy file"
    )
    predict.add_argument(
        "--output", type=Path, default=Path("predictions.csv"), help=".csv or .json"
    )
