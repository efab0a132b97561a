"""The real MNIST files through the pipeline, as a user drives it, in a scratch project:

1. `pipeline train --preset seed-mlp-mnist` against the hand-written tutorial loop
   (bench/tutorial_mnist.py), interleaved: wall time (each command timed from outside, imports
   included), the fixed cost (wall minus the epochs) and both test accuracies.
2. `--preset lenet-mnist`, three times: wall, seconds in epochs, test accuracy (time to 99 %).
3. The training DAG (`airflow dags test`, preset lenet-mnist): wall against its epochs.
4. `train.optimizer.lr: auto` against the best lr of a small grid (lenet-mnist otherwise).
5. The Optuna search against the grid (the sweep DAG's tasks in one process): trial-epochs, the
   chosen trial's validation accuracy and its test accuracy.
6. "unknown" answers (`serve.abstain`): lenet-mnist registered and served by `pipeline serve`;
   MNIST's test split sent in requests of 256 images (the sets' coverage, the unknown rate, the
   accuracy of what it answered), then Fashion-MNIST's 10,000 test images (the share answered
   "unknown"), from FASHION_MNIST_DIR (default /usr/share/datasets/fashion-mnist, Debian's
   `dataset-fashion-mnist`; skipped, with the reason, when absent).
7. Two machines (`pipeline train --nnodes 2 --nproc 1`, both on this host, gloo over loopback)
   against one process: images/s and test accuracy.

The files come from PIPELINE_MNIST_DIR (the four IDX files as distributed, gzip or not);
default `../shared/datasets/mnist` beside the checkout when it exists. `--quick` (the smoke,
`make bench-smoke`) writes small synthetic files in the same format instead and runs every part
but lenet and dag with fewer rounds and epochs (lr_auto without its grid). `python
bench/mnist.py` writes bench/out/mnist.json and prints it (about 25 minutes on 2 cores; `--only
NAME` runs one part).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import BIN, ROOT, _env, mnist_files, scratch_project  # noqa: E402

OUT = ROOT / "bench" / "out"
DEFAULT_DIR = ROOT.parent / "shared" / "datasets" / "mnist"
EPOCH = re.compile(r"^epoch +\d+/\d+ .*\((\d+\.\d+)s\)$", re.M)


def _run(project: Path, cmd: list[str], timeout: int = 1800) -> tuple[float, str, str]:
    """Wall seconds, stdout and stderr of `cmd` in the project (Airflow's home in it)."""
    env = _env(project) | {
        "AIRFLOW_HOME": str(project / ".airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return seconds, out.stdout, out.stderr


def pipeline(project: Path, *args: str) -> tuple[float, dict, str]:
    seconds, stdout, stderr = _run(project, [str(BIN / "pipeline"), *args])
    text = "\n" + stdout.strip()  # the JSON result comes last; `data pull` talks first
    return seconds, json.loads(text[text.rfind("\n{") + 1 :]) if stdout.strip() else {}, stderr


def train_and_score(project: Path, *args: str) -> dict:
    """`pipeline train ARGS` timed, then `pipeline evaluate` (not timed): wall, seconds in
    epochs, fixed cost, test accuracy, and the calibration (ECE before and after, T)."""
    wall, _, said = pipeline(project, "train", *args)
    epochs = sum(float(s) for s in EPOCH.findall(said))
    _, scores, _ = pipeline(project, "evaluate", *args)
    calibration = ("test_prob_ece", "test_prob_ece_calibrated", "val_temperature")
    calibration += ("test_set_coverage", "test_unknown_rate")
    return {"wall_s": round(wall, 2), "epochs_s": round(epochs, 2),
            "fixed_s": round(wall - epochs, 2),
            "test_accuracy": scores["test_accuracy"],
            **{k: round(scores[k], 4) for k in calibration if k in scores}}  # fmt: skip


def tutorial(project: Path, files: Path, epochs: int) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "tutorial_mnist.py"), str(files), str(epochs)]
    wall, stdout, _ = _run(project, cmd)
    result = json.loads(stdout.strip().splitlines()[-1])
    spent = sum(result["epoch_seconds"])
    return {"wall_s": round(wall, 2), "epochs_s": round(spent, 2),
            "fixed_s": round(wall - spent, 2),
            "test_accuracy": result["test_accuracy"]}  # fmt: skip


def seed_vs_tutorial(project: Path, files: Path, rounds: int, epochs: int) -> dict:
    """Interleaved: pipeline, tutorial, pipeline, tutorial, ... on a quiet machine."""
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(train_and_score(project, "--preset", "seed-mlp-mnist",
                                    "--set", f"train.epochs={epochs}"))  # fmt: skip
        theirs.append(tutorial(project, files, epochs))
    ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(ours, theirs, strict=True)]
    return {"pipeline": ours, "tutorial": theirs,
            "wall_ratio_median": round(statistics.median(ratios), 3),
            "wall_ratios": [round(r, 3) for r in ratios]}  # fmt: skip


def lenet(project: Path, rounds: int, epochs: int) -> dict:
    runs = [train_and_score(project, "--preset", "lenet-mnist",
                            "--set", f"train.epochs={epochs}") for _ in range(rounds)]  # fmt: skip
    return {"runs": runs,
            "median_epochs_s": statistics.median(r["epochs_s"] for r in runs),
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_test_accuracy": statistics.median(
                r["test_accuracy"] for r in runs)}  # fmt: skip


def dag(project: Path, epochs: int) -> dict:
    """`airflow dags test` of the training DAG with the lenet preset: wall against its epochs."""
    _run(project, ["bash", str(ROOT / "scripts" / "airflow-init.sh")])
    conf = json.dumps({"preset": "lenet-mnist", "epochs": epochs, "force_retrain": True})
    wall, stdout, stderr = _run(
        project, [str(BIN / "airflow"), "dags", "test", "train_image_classifier", "-c", conf]
    )
    epochs_s = sum(float(s) for s in EPOCH.findall(stdout + stderr))
    return {"wall_s": round(wall, 1), "epochs_s": round(epochs_s, 1),
            "beyond_epochs_s": round(wall - epochs_s, 1)}  # fmt: skip


def lr_auto(project: Path, lrs: list[float], epochs: int) -> dict:
    grid = {
        str(lr): train_and_score(project, "--preset", "lenet-mnist", "--set",
                                 f"train.optimizer.lr={lr}", "--set", f"train.epochs={epochs}")
        for lr in lrs
    }  # fmt: skip
    auto = train_and_score(
        project, "--preset", "lenet-mnist", "--set", "train.optimizer.lr=auto",
        "--set", f"train.epochs={epochs}",
    )  # fmt: skip
    if not grid:  # the smoke: lr auto alone
        return {"auto": auto["test_accuracy"]}
    best = max(grid, key=lambda lr: grid[lr]["test_accuracy"])
    return {"grid_test_accuracy": {lr: r["test_accuracy"] for lr, r in grid.items()},
            "best_lr": float(best), "best_of_grid": grid[best]["test_accuracy"],
            "auto": auto["test_accuracy"],
            "auto_minus_best_points": round(100 * (auto["test_accuracy"]
                                                   - grid[best]["test_accuracy"]), 2)}  # fmt: skip


def search(project: Path, trials: int, epochs: int, grid: dict | None = None) -> dict:
    """Grid (params.yaml's `sweep:` block, or `grid` overrides of it) against Optuna (the
    default space, hyperband), lenet at `epochs` per trial, in a child process pointed at the
    project."""
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "bench")!r})
from search import in_project, sweep
from pathlib import Path
settings, validation, config = in_project(Path({str(project)!r}))
base = {{"base.preset": "lenet-mnist", "sweep.epochs": {epochs}, **{grid or {}!r}}}
out = {{"grid": sweep(settings, validation, config(base)),
       "optuna": sweep(settings, validation, config(base | {{"sweep.strategy": "optuna",
                                                             "sweep.optuna.trials": {trials}}}))}}
print(json.dumps(out))
"""
    _, stdout, _ = _run(project, [sys.executable, "-c", code], timeout=7200)
    return json.loads(stdout.strip().splitlines()[-1])


def nodes(project: Path, epochs: int) -> dict:
    """lenet-mnist as one process, then as two machines of one process each (two `pipeline
    train --nnodes 2` meeting at a c10d rendezvous on loopback, gloo): images/s (the epochs'
    median, all ranks together) and test accuracy of each, and their ratio."""
    recipe = ["--preset", "lenet-mnist", "--set", f"train.epochs={epochs}"]
    speed = re.compile(r"^epoch +\d+/\d+ .* ([\d,]+) img/s", re.M)

    def score(said: str) -> dict:
        rates = [float(r.replace(",", "")) for r in speed.findall(said)]
        _, scores, _ = pipeline(project, "evaluate", *recipe)
        return {"images_per_s": statistics.median(rates), "test_accuracy": scores["test_accuracy"]}

    one = score(pipeline(project, "train", *recipe)[2])
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    endpoint = f"127.0.0.1:{port.getsockname()[1]}"
    port.close()
    two = ["train", "--nnodes", "2", "--nproc", "1", "--rdzv-endpoint", endpoint,
           "--rdzv-id", "bench", *recipe]  # fmt: skip
    machines = [
        subprocess.Popen([str(BIN / "pipeline"), *two], cwd=project, env=_env(project),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    said = "".join(m.communicate(timeout=1800)[1] for m in machines)
    if any(m.returncode for m in machines):
        raise RuntimeError(f"the two-machine training failed:\n{said[-3000:]}")
    both = score(said)
    return {"one_process": one, "two_machines": both, "epochs": epochs,
            "images_per_s_ratio": round(both["images_per_s"] / one["images_per_s"], 3)}  # fmt: skip


PARTS = ("seed_vs_tutorial", "lenet", "dag", "lr_auto", "search", "abstain", "nodes")
FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")


def _idx_images(path: Path) -> np.ndarray:
    """N x 1 x 28 x 28 uint8 from an IDX image file (gzip or not)."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)


def _served_rows(port: int, pixels: np.ndarray) -> list[dict]:
    rows = []
    for start in range(0, len(pixels), 256):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        body = json.dumps({"inputs": pixels[start : start + 256].tolist()})
        connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        assert answer.status == 200, answer.read()[:300]
        rows += json.loads(answer.read())["predictions"]
    return rows


def abstain(project: Path, epochs: int) -> dict:
    recipe = ("--preset", "lenet-mnist", "--set", f"train.epochs={epochs}")
    scored = train_and_score(project, *recipe)
    pipeline(project, "register", *recipe, "--set", "register.floor=0")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(BIN / "pipeline"), "serve", "--port", str(port), "--preset", "lenet-mnist"]
    command += ["--set", "serve.abstain=true"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    server = subprocess.Popen(command, cwd=project, env=_env(project), **quiet)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        pixels = np.load(project / "data" / "test_images.npy")
        labels = np.load(project / "data" / "test_labels.npy")
        classes = json.loads((project / "data" / "meta.json").read_text())["classes"]
        rows = _served_rows(port, pixels)
        truth = [classes[k] for k in labels]
        covered = [t in r["set"] for r, t in zip(rows, truth, strict=True)]
        answered = [(r["prediction"], t) for r, t in zip(rows, truth, strict=True)
                    if r["prediction"] != "unknown"]  # fmt: skip
        result = {
            "test_accuracy": scored["test_accuracy"],
            "evaluate": scored,
            "mnist_test": {
                "images": len(rows),
                "coverage": round(float(np.mean(covered)), 4),
                "unknown_rate": round(1 - len(answered) / len(rows), 4),
                "accuracy_of_answered": round(np.mean([p == t for p, t in answered]), 4),
            },
        }
        files = sorted(FASHION_DIR.glob("t10k-images-idx3-ubyte*"))
        if not files:
            result["fashion_mnist_test"] = {"skipped": f"no Fashion-MNIST files in {FASHION_DIR}"}
            return result
        fashion = _served_rows(port, _idx_images(files[0]))
        reasons = [r["abstained"] for r in fashion]
        result["fashion_mnist_test"] = {
            "images": len(fashion),
            "unknown_rate": round(np.mean([r is not None for r in reasons]), 4),
            **{f"unknown_{why}": round(reasons.count(why) / len(fashion), 4)
               for why in ("several_classes", "no_class", "out_of_distribution")},
        }  # fmt: skip
        return result
    finally:
        server.terminate()
        server.wait(timeout=60)


def write_result(name: str, quick: bool, result: dict) -> None:
    """bench/out/NAME.json (NAME-quick.json for a smoke), and the same JSON on stdout; the parts
    not run this time (`--only`) are kept from the file as it was."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}{'-quick' if quick else ''}.json"
    result = (json.loads(path.read_text()) if path.exists() else {}) | result
    text = json.dumps(result, indent=2)
    path.write_text(text + "\n")
    print(text)


def pulled_project(tmp: Path, quick: bool) -> tuple[Path, Path]:
    """(the MNIST files, a scratch project that pulled them): the real files, or with `quick`
    small synthetic ones in the same format (validation's clipping checks off for them)."""
    if quick:
        files = mnist_files(tmp / "files", sizes=(2_000, 500)) / "MNIST" / "raw"
    else:
        files = Path(os.environ.get("PIPELINE_MNIST_DIR") or DEFAULT_DIR)
        if not files.is_dir():
            sys.exit(f"no MNIST files at {files}: set PIPELINE_MNIST_DIR, or use --quick")
    project = scratch_project(tmp)
    pipeline(project, "data", "pull", "--dataset", "mnist", "--source-dir", str(files))
    if quick:  # synthetic bars: a constant background, unlike photos
        params = project / "params.yaml"
        text = params.read_text().replace("max_share_at_0: 0.95", "max_share_at_0: null")
        params.write_text(text.replace("max_share_at_255: 0.5", "max_share_at_255: null"))
    return files, project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small synthetic files: a smoke")
    parser.add_argument("--only", choices=PARTS, action="append", help="this part (repeatable)")
    args = parser.parse_args()
    # The smoke leaves out the lenet part (lr_auto and search train that preset too) and the DAG
    # part (half the smoke's time; `make test` runs that DAG with `airflow dags test` itself).
    parts = args.only or [p for p in PARTS if not (args.quick and p in ("lenet", "dag"))]
    with tempfile.TemporaryDirectory(prefix="bench-mnist-") as tmp:
        tmp = Path(tmp)
        files, project = pulled_project(tmp, args.quick)
        pipeline(project, "validate", "--preset", "lenet-mnist")
        quick = args.quick
        results = {"files": str(files), "quick": quick}
        runs = {
            "seed_vs_tutorial": lambda: seed_vs_tutorial(project, files, 1 if quick else 7,
                                                         1 if quick else 10),
            "lenet": lambda: lenet(project, 1 if quick else 3, 1 if quick else 3),
            "dag": lambda: dag(project, 1 if quick else 3),
            "lr_auto": lambda: lr_auto(project, [] if quick else [0.001, 0.003, 0.01],
                                       1 if quick else 3),
            "search": lambda: search(project, 2 if quick else 8, 1 if quick else 2,
                                     {"sweep.optimizers": ["adamw"], "sweep.lrs": [0.005]}
                                     if quick else None),
            "abstain": lambda: abstain(project, 1 if quick else 3),
            "nodes": lambda: nodes(project, 1 if quick else 3),
        }  # fmt: skip
        for part in parts:
            started = time.perf_counter()
            results[part] = runs[part]()
            print(f"{part}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    write_result("mnist", args.quick, results)


if __name__ == "__main__":
    main()
