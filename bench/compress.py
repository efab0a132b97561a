"""Compression on MNIST-format files, as a user drives it, in a scratch project: a CNN teacher
(`--preset cnn-mnist`, 3 epochs) trained, evaluated and registered, then `pipeline compress` with
all three methods (distill into a 16-unit LeNet, prune half the channels, quantize to int8).
One row per model: parameters, file bytes, MACs per image, CPU latency p50 / p95 at batch 1,
throughput at batch 256 and test accuracy, each model measured beside the teacher in the compress
process (`efficiency.speed`); for int8 also the float model in ONNX Runtime. And the wall time
and peak RSS of the compress command.

The files come from PIPELINE_MNIST_DIR (the four IDX files), default ../shared/datasets/mnist
beside the checkout. `--quick` (`make bench-smoke`) writes small synthetic files in the same
format and trains a LeNet teacher for one epoch. `python bench/compress.py` writes
bench/out/compress.json and prints it (about 16 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist import pipeline, pulled_project, write_result  # noqa: E402
from scale import stage  # noqa: E402

FIGURES = ("params", "model_bytes", "macs", "latency_p50_ms", "latency_p95_ms", "throughput")


def rows(result: dict) -> list[dict]:
    """The teacher's row (from the first result: it is measured beside each) and one per
    method, plus the float ONNX model the int8 one is measured against."""
    first = result["results"][0]
    table = [
        {"model": "teacher", **{k: first[f"teacher_{k}"] for k in FIGURES},
         "test_accuracy": first.get("teacher_test_accuracy")},
    ]  # fmt: skip
    for r in result["results"]:
        scores = {"test_accuracy": r["test_accuracy"]}
        table.append({"model": r["method"], **{k: r[k] for k in FIGURES}, **scores})
        if "float_onnx_latency_p50_ms" in r:
            speed = {k: r[f"float_onnx_{k}"] for k in FIGURES[3:]}
            table.append({"model": "float (ONNX Runtime)", **speed})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small synthetic files: a smoke")
    parser.add_argument("--set", action="append", default=[], help="more compress settings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        tmp = Path(tmp)
        files, project = pulled_project(tmp, args.quick)
        teacher = "lenet-mnist" if args.quick else "cnn-mnist"
        recipe = ["--preset", teacher, "--set", f"train.epochs={1 if args.quick else 3}"]
        pipeline(project, "validate", *recipe)
        pipeline(project, "train", *recipe)
        pipeline(project, "evaluate", *recipe)
        pipeline(project, "register", *recipe, "--set", "register.floor=0")
        sets = ["compress.methods=[distill,prune,quantize]", "register.floor=0"]
        sets += ["compress.distill.student.hidden=16"]
        if args.quick:
            sets += ["compress.distill.epochs=1", "compress.prune.epochs=1"]
            sets += ["compress.latency_runs=20"]
        sets += args.set  # e.g. compress.prune.lr_scale=0.1
        cost = stage(project, ["compress", *recipe, *(a for s in sets for a in ("--set", s))])
        result = json.loads((project / "outputs" / "compressed.json").read_text())
    out = {
        "files": str(files),
        "quick": args.quick,
        "teacher": recipe,
        "settings": sets,
        "compress_command": cost,
        "rows": rows(result),
        "decisions": {r["method"]: r["registered"]["reason"] for r in result["results"]},
    }
    write_result("compress", args.quick, out)


if __name__ == "__main__":
    main()
