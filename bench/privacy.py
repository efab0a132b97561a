"""Differential privacy and explanations on MNIST-format files, as a user drives them, in a scratch
project:

1. Accuracy against epsilon: LeNet (`--preset lenet-mnist`) trained without privacy, then with
   DP-SGD (`train.privacy`) at three noise multipliers, each evaluated: test accuracy, epsilon at
   delta, and the mean epoch time (DP-SGD's per-example gradients against the plain loop).
2. The cost of `pipeline explain` per image: every attribution method on the non-private model,
   48 test images (5 per class and 4 mistakes), milliseconds per image per method, with the
   command's wall time and peak RSS.

The files come from PIPELINE_MNIST_DIR (the four IDX files), default ../shared/datasets/mnist
beside the checkout. `--quick` (`make bench-smoke`) writes small synthetic files in the same
format, one epoch, one noise level. `python bench/privacy.py` writes bench/out/privacy.json and
prints it (about 12 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist import EPOCH, pipeline, pulled_project, write_result  # noqa: E402
from scale import stage  # noqa: E402

NOISE = (0.6, 1.0, 2.0)  # train.privacy.noise_multiplier, from a weak to a strong guarantee
# DP-SGD wants larger batches (the noise is averaged over the expected batch) and a constant lr
# (a decaying one spends epsilon on steps that barely move the weights); SGD lr 0.1 with
# momentum beat 0.5 and AdamW 0.003 in one epoch here (90.0 %, 82.7 %, 90.1 %).
PRIVATE = [
    "train.batch_size=256",
    "train.optimizer.name=sgd",
    "train.optimizer.lr=0.1",
    "train.optimizer.weight_decay=0",
    "train.schedule.name=constant",
    "train.privacy.enabled=true",
    "train.privacy.max_grad_norm=1.0",
]
METHODS = "[integrated_gradients,saliency,occlusion,kernel_shap,lime]"


def _sets(pairs: list[str]) -> list[str]:
    return [a for pair in pairs for a in ("--set", pair)]


def trained(project: Path, recipe: list[str], more: list[str]) -> dict:
    """Train, evaluate: test accuracy, the guarantee (if private), mean epoch seconds."""
    args = [*recipe, *_sets(more)]
    seconds, out, stderr = pipeline(project, "train", *args)
    _, scores, _ = pipeline(project, "evaluate", *args)
    epochs = [float(s) for s in EPOCH.findall(stderr)]
    spent = re.findall(r" epsilon (\S+) ", stderr)
    return {
        "settings": more,
        "run_id": out["run_id"],
        "test_accuracy": scores["test_accuracy"],
        "epsilon": float(spent[-1]) if spent else None,
        "epoch_seconds": round(statistics.mean(epochs), 2),
        "train_command_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small synthetic files: a smoke")
    args = parser.parse_args()
    epochs = 1 if args.quick else 3
    recipe = ["--preset", "lenet-mnist", "--set", f"train.epochs={epochs}"]
    recipe += ["--set", "train.val_fraction=0"]  # every model trains on the same rows
    with tempfile.TemporaryDirectory(prefix="bench-privacy-") as tmp:
        files, project = pulled_project(Path(tmp), args.quick)
        pipeline(project, "validate", *recipe)
        plain = trained(project, recipe, [])
        rows = [plain]
        for sigma in NOISE[1:2] if args.quick else NOISE:
            private = [*PRIVATE, f"train.privacy.noise_multiplier={sigma}"]
            rows.append(trained(project, recipe, private))
            print(json.dumps(rows[-1]), file=sys.stderr)
        explain = [f"explain.methods={METHODS}", "explain.max_images=48", "explain.per_class=5"]
        cost = stage(project, ["explain", "--run-id", plain["run_id"], *recipe, *_sets(explain)])
        summary = json.loads((project / "outputs" / "explained.json").read_text())
    out = {
        "files": str(files),
        "quick": args.quick,
        "recipe": recipe,
        "private_settings": PRIVATE,
        "accuracy_vs_epsilon": rows,
        "explain": {
            "images": summary["images"],
            "ms_per_image": summary["ms_per_image"],
            "command": cost,
        },
    }
    write_result("privacy", args.quick, out)


if __name__ == "__main__":
    main()
