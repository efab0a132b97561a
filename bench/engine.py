"""Training-engine benchmarks: ratios measured in one run, never asserted in tests.

    .venv/bin/python bench/engine.py            # CPU set (make bench): bench/results.json
    .venv/bin/python bench/engine.py --gpu      # CUDA set (bench/gpu.sh): bench/out/gpu.json

1. engine vs a hand-written loop over device-resident tensors (same model, data, batch, steps)
2. engine vs the classic tutorial's DataLoader loop (MLP 784-128-10, SGD 0.01 momentum 0.9,
   batch 64, DataLoader(TensorDataset, shuffle=True)) on MNIST-shaped data
3. MLflow tracking overhead: the engine with the train stage's tracking vs tracking off
4. time to 98.5 % test accuracy on digits (the fast-cnn-digits preset, several seeds)
5. peak RSS of a training process on MNIST-shaped data
Throughput pairs alternate engine and baseline epochs so that machine noise hits both; each
figure is the median over rounds. Synthetic data: uint8 pixels with a learnable class signal.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.store import Split  # noqa: E402
from pipeline.training.batches import Rows, pixel_stats  # noqa: E402
from pipeline.training.engine import fit, pick_device  # noqa: E402
from pipeline.training.models import ModelSpec, rebuild  # noqa: E402
from pipeline.training.optim import build_optimizer  # noqa: E402
from pipeline.training.schedules import lr_factor  # noqa: E402


def mnist_shaped(n: int = 60_000, shape=(1, 28, 28), seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 200, (n, *shape), dtype=np.uint8)
    images[np.arange(n), 0, labels, 0] = 255  # a pixel that gives the class away
    return Split(images, labels)


def config(preset: str | None = None, **overrides):
    layers = {"base.preset": preset} if preset else {}
    layers |= {"train.val_fraction": 0.0, **overrides}
    return load_config(ROOT / "params.yaml", layers)


def engine_epochs(cfg, split: Split) -> list[float]:
    """Seconds of each epoch as the engine reports them."""
    result = fit(cfg.train, split, [str(i) for i in range(10)], cfg.base.seed)
    return [h["epoch_seconds"] for h in result.history]


def hand_loop_epochs(cfg, split: Split, epochs: int) -> list[float]:
    """nanoGPT-style plain loop: device tensors, a permutation per epoch, index slices, the
    engine's recipe (optimizer with decay / no-decay groups, lr schedule set every step)."""
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.base.seed)
    mean, std = pixel_stats(Rows(split))
    spec = ModelSpec(
        cfg.train.model.model_dump(),
        tuple(split.images.shape[1:]),
        tuple(str(i) for i in range(10)),
        mean,
        std,
    )
    model = rebuild(spec).to(device)
    opt = build_optimizer(model, cfg.train.optimizer)  # same recipe; the loop is what differs
    x = torch.from_numpy(np.array(split.images, dtype=np.float32)).to(device)
    y = torch.from_numpy(split.labels).to(device)
    bs, out, step = cfg.train.batch_size, [], 0
    steps_per_epoch = math.ceil(len(y) / bs)
    for _ in range(epochs):
        start = time.perf_counter()
        for idx in torch.randperm(len(y), device=device).split(bs):
            lr = cfg.train.optimizer.lr * lr_factor(
                step, steps_per_epoch, epochs, cfg.train.schedule
            )
            for group in opt.param_groups:  # the same schedule, set per step as nanoGPT does
                group["lr"] = lr
            step += 1
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def tutorial_loop_epochs(split: Split, epochs: int) -> list[float]:
    """The tutorial's loop over in-memory tensors: DataLoader(TensorDataset), per-sample collate."""
    from torch.utils.data import TensorDataset

    data = TensorDataset(
        torch.from_numpy(split.images.astype(np.float32) / 255), torch.from_numpy(split.labels)
    )
    return _tutorial_loop(data, epochs)


def torchvision_tutorial_epochs(split: Split, epochs: int) -> list[float]:
    """The tutorial as written: torchvision's MNIST reading IDX files (here: synthetic pixels in
    the real format), ToTensor + Normalize per sample, DataLoader(batch 64, shuffle)."""
    import struct

    from torchvision import datasets, transforms

    root = Path(tempfile.mkdtemp(prefix="bench-mnist-"))
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, images, labels in (
        ("train", split.images[:, 0], split.labels),
        ("t10k", split.images[:10, 0], split.labels[:10]),
    ):
        for kind, array, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
            header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    data = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    return _tutorial_loop(data, epochs)


def _tutorial_loop(data, epochs: int) -> list[float]:
    from torch.utils.data import DataLoader

    device = pick_device("auto")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    out = []
    for _ in range(epochs):
        start = time.perf_counter()
        for xb, yb in DataLoader(data, batch_size=64, shuffle=True):
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def paired_ratio(engine, baseline, rounds: int) -> dict:
    """Alternate engine and baseline runs; median epoch seconds, first epoch of each dropped."""
    e, b = [], []
    for _ in range(rounds):
        e += engine()[1:]
        b += baseline()[1:]
    e_med, b_med = statistics.median(e), statistics.median(b)
    return {
        "engine_epoch_s": e_med,
        "baseline_epoch_s": b_med,
        "ratio": b_med / e_med,
        "epochs_each": len(e),
    }


def tracking_overhead(cfg, split: Split, rounds: int) -> dict:
    """Whole fit() wall time with the train stage's MLflow tracking vs without."""
    import mlflow

    from pipeline.tracking.recorder import SYSTEM_METRICS_INTERVAL_S, log_epoch

    store = tempfile.mkdtemp(prefix="bench-mlflow-")
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    mlflow.set_experiment("bench")
    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    mlflow.set_system_metrics_samples_before_logging(1)
    classes = [str(i) for i in range(10)]
    on, off = [], []
    fit(cfg.train, split, classes, 0)  # warm-up: first-touch allocations, thread pools
    for i in range(rounds):
        for tracked in (True, False) if i % 2 else (False, True):  # alternate who goes first
            start = time.perf_counter()
            if tracked:
                with mlflow.start_run(log_system_metrics=True) as run:
                    logged = partial(log_epoch, mlflow.MlflowClient(), run.info.run_id)
                    fit(cfg.train, split, classes, 0, on_epoch=logged)
                on.append(time.perf_counter() - start)
            else:
                fit(cfg.train, split, classes, 0)
                off.append(time.perf_counter() - start)
    on_med, off_med = statistics.median(on), statistics.median(off)
    return {
        "tracked_s": on_med,
        "untracked_s": off_med,
        "overhead": on_med / off_med - 1,
        "epochs": cfg.train.epochs,
    }


def checkpoint_upload_overhead(cfg, split: Split, rounds: int) -> dict:
    """Median epoch seconds of a tracked fit writing its checkpoint every epoch, with the
    train stage's upload of each checkpoint to the MLflow run (the recorder's background
    thread) vs without. The checkpoints of the bigger `cnn` model make the upload visible."""
    import mlflow

    from pipeline.tracking.recorder import Recorder

    store = tempfile.mkdtemp(prefix="bench-mlflow-")
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    artifacts = (Path(store) / "artifacts").as_uri()  # not ./mlruns
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("checkpoints", artifacts))
    classes = [str(i) for i in range(10)]
    path = Path(store) / "checkpoint.pt"

    def epochs(upload: bool) -> list[float]:
        with mlflow.start_run() as run:
            recorder = Recorder()  # in-process: its upload thread is the one a sweep uses
            recorder.client, recorder.run_id = mlflow.MlflowClient(), run.info.run_id

            def logged(row):
                recorder.epoch(row, path if upload else None)

            result = fit(cfg.train, split, classes, 0, on_epoch=logged, checkpoint_path=path)
            if recorder.uploads is not None:
                recorder.uploads.shutdown(wait=True)
        return [row["epoch_seconds"] for row in result.history][1:]

    on, off = [], []
    for i in range(rounds):
        for upload in (True, False) if i % 2 else (False, True):
            (on if upload else off).extend(epochs(upload))
    on_med, off_med = statistics.median(on), statistics.median(off)
    size = path.stat().st_size / 1e6
    return {
        "uploaded_epoch_s": on_med,
        "local_only_epoch_s": off_med,
        "overhead": on_med / off_med - 1,
        "checkpoint_mb": size,
    }


def time_to_accuracy_digits(seeds: range) -> dict:
    from pipeline.config import DataConfig
    from pipeline.data.sources import load_source
    from pipeline.training.inference import predict
    from pipeline.training.scoring import metrics

    ds = load_source("digits", DataConfig())
    rows = []
    for seed in seeds:
        cfg = config("fast-cnn-digits", **{"base.seed": seed})
        start = time.perf_counter()
        result = fit(cfg.train, ds.train, ds.classes, seed)
        seconds = time.perf_counter() - start
        acc = metrics(ds.test.labels, predict(result.model, ds.test.images), ds.classes)
        rows.append({"seed": seed, "train_s": seconds, "test_accuracy": acc["test_accuracy"]})
    return {
        "preset": "fast-cnn-digits",
        "runs": rows,
        "median_train_s": statistics.median(r["train_s"] for r in rows),
        "median_test_accuracy": statistics.median(r["test_accuracy"] for r in rows),
        "reached_985": sum(r["test_accuracy"] >= 0.985 for r in rows),
    }


def peak_rss_mb() -> float:
    """Peak RSS of a child process training seed-mlp-mnist on MNIST-shaped data (1 epoch)."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import engine as b; "
        "cfg = b.config('seed-mlp-mnist', **{'train.epochs': 1}); "
        "b.engine_epochs(cfg, b.mnist_shaped())"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def cpu_set(quick: bool) -> dict:
    """`quick` (the CI smoke): a sixth of the rows, 2 epochs (the first is dropped), one round."""
    rounds, epochs = (1, 2) if quick else (3, 3)
    data = mnist_shaped(10_000 if quick else 60_000)
    adamw = config(
        None,
        **{"train.model.name": "mlp", "train.epochs": epochs, "train.schedule.warmup_epochs": 0},
    )
    seed = config("seed-mlp-mnist", **{"train.epochs": epochs})
    return {
        "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU",
        "engine_vs_hand_loop": {
            "setup": f"MLP 784-128-10 (default AdamW + cosine), {len(data.labels):,} x 1 x 28 "
            "x 28, batch 64",
            **paired_ratio(
                lambda: engine_epochs(adamw, data),
                lambda: hand_loop_epochs(adamw, data, epochs),
                2 * rounds,
            ),
        },
        "engine_vs_tutorial_dataloader": {
            "setup": "seed-mlp-mnist preset vs DataLoader(TensorDataset, batch 64, shuffle)",
            **paired_ratio(
                lambda: engine_epochs(seed, data),
                lambda: tutorial_loop_epochs(data, epochs),
                rounds,
            ),
        },
        "hand_loop_vs_tutorial_dataloader": {
            "setup": "the hand-written loop above (seed-mlp-mnist recipe) vs the same DataLoader "
            "loop: what index slicing alone gains on this machine",
            **paired_ratio(
                lambda: hand_loop_epochs(seed, data, epochs),
                lambda: tutorial_loop_epochs(data, epochs),
                rounds,
            ),
        },
        "engine_vs_tutorial_torchvision": {
            "setup": "seed-mlp-mnist preset vs torchvision MNIST (IDX files, ToTensor + "
            "Normalize per sample) + DataLoader(batch 64, shuffle)",
            **paired_ratio(
                lambda: engine_epochs(seed, data),
                lambda: torchvision_tutorial_epochs(data, epochs),
                rounds,
            ),
        },
        "tracking_overhead": {
            "setup": f"seed-mlp-mnist, {epochs} epochs, MLflow on SQLite, "
            "per-epoch metrics + system metrics",
            **tracking_overhead(seed, data, rounds),
        },
        "checkpoint_upload_overhead": {
            "setup": "cnn, MNIST-shaped 4,000 images, 3 epochs, checkpoint every epoch, "
            "MLflow on SQLite; epoch time with each checkpoint uploaded to the run vs not",
            **checkpoint_upload_overhead(
                config(**{"train.model.name": "cnn", "train.epochs": 3}),
                mnist_shaped(4_000),
                rounds,
            ),
        },
        "time_to_985_digits": time_to_accuracy_digits(range(1 if quick else 5)),
        "peak_rss_mb_mnist_shaped": peak_rss_mb(),
    }


def gpu_set(smoke: bool) -> dict:
    """Throughput ratios on CUDA, ResNet-18 throughput on CIFAR-shaped data, and accuracy
    targets when real data is mounted (bench/gpu.sh sets PIPELINE_BENCH_DATA)."""
    n = 2_000 if smoke else 60_000
    data = mnist_shaped(n)
    adamw = config(
        None, **{"train.model.name": "mlp", "train.epochs": 3, "train.schedule.warmup_epochs": 0}
    )
    seed = config("seed-mlp-mnist", **{"train.epochs": 3})
    big = config(None, **{"train.model.name": "cnn", "train.epochs": 3, "train.batch_size": 512})
    out = {
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke)",
        "engine_vs_hand_loop_mlp": paired_ratio(
            lambda: engine_epochs(adamw, data), lambda: hand_loop_epochs(adamw, data, 3), 2
        ),
        "engine_vs_hand_loop_cnn_b512": paired_ratio(
            lambda: engine_epochs(big, data), lambda: hand_loop_epochs(big, data, 3), 2
        ),
        "engine_vs_tutorial_dataloader": paired_ratio(
            lambda: engine_epochs(seed, data), lambda: tutorial_loop_epochs(data, 3), 2
        ),
    }
    cifar = mnist_shaped(512 if smoke else 50_000, (3, 32, 32))
    resnet = config("resnet18-cifar10", **{"train.epochs": 2})
    epochs = engine_epochs(resnet, cifar)
    out["resnet18_cifar_shaped_img_per_s"] = len(cifar.labels) / epochs[-1]
    out.update(accuracy_targets(smoke))
    return out


def accuracy_targets(smoke: bool) -> dict:
    """MNIST to 99 % (cnn-mnist) and CIFAR-10 to 94 % (resnet18-cifar10) on real files, if any."""
    import os

    from pipeline.data.sources.cifar10 import cifar10
    from pipeline.data.sources.idx import mnist_like
    from pipeline.training.inference import predict
    from pipeline.training.scoring import metrics

    root = Path(os.environ.get("PIPELINE_BENCH_DATA", "/nonexistent"))
    out = {}
    for name, preset, load in (
        ("mnist_99", "cnn-mnist", lambda: mnist_like("mnist", root / "mnist", False)),
        ("cifar10_94", "resnet18-cifar10", lambda: cifar10(root / "cifar10", False)),
    ):
        try:
            ds = load()
        except Exception as exc:  # no real data mounted: say so, do not invent a figure
            out[name] = f"skipped: {type(exc).__name__}: {str(exc)[:120]}"
            continue
        cfg = config(preset, **({"train.epochs": 1} if smoke else {}))
        start = time.perf_counter()
        result = fit(cfg.train, ds.train, ds.classes, cfg.base.seed)
        seconds = time.perf_counter() - start
        acc = metrics(ds.test.labels, predict(result.model, ds.test.images), ds.classes)
        out[name] = {"train_s": seconds, "test_accuracy": acc["test_accuracy"]}
    return out


def render_markdown(r: dict, command: str) -> str:
    """The CPU table for BENCHMARKS.md, between its engine markers."""
    t = r["time_to_985_digits"]
    ratios = (
        ("engine_vs_hand_loop", "engine vs hand-written device-tensor loop (goal >= 0.97)", ".3f"),
        ("engine_vs_tutorial_dataloader", "engine vs tutorial DataLoader (goal >= 1.5)", ".2f"),
        ("hand_loop_vs_tutorial_dataloader", "hand-written loop vs tutorial DataLoader", ".2f"),
        ("engine_vs_tutorial_torchvision", "engine vs tutorial torchvision MNIST pipeline", ".2f"),
    )
    rows = [
        (f"{label}, samples/s ratio", format(r[key]["ratio"], fmt), r[key]["setup"])
        for key, label, fmt in ratios
    ]
    rows += [
        (
            "MLflow tracking overhead (goal <= 3 %)",
            f"{100 * r['tracking_overhead']['overhead']:+.1f} %",
            r["tracking_overhead"]["setup"],
        ),
        (
            "checkpoint upload to the MLflow run, epoch time (goal: no slower)",
            f"{100 * r['checkpoint_upload_overhead']['overhead']:+.1f} % "
            f"({r['checkpoint_upload_overhead']['checkpoint_mb']:.1f} MB a checkpoint)",
            r["checkpoint_upload_overhead"]["setup"],
        ),
        (
            "time to 98.5 % test accuracy on digits (goal <= 2 s), median",
            f"{t['median_train_s']:.2f} s at {t['median_test_accuracy']:.4f}",
            f"{t['preset']} preset, {len(t['runs'])} seeds, {t['reached_985']} reached 98.5 %",
        ),
        (
            "peak RSS of a training process, MNIST-shaped data",
            f"{r['peak_rss_mb_mnist_shaped']:.0f} MB",
            "seed-mlp-mnist, 1 epoch, 60,000 images",
        ),
    ]
    lines = [
        f"Machine: {r['machine']}. Command: `{command}` (figures: `bench/results.json`).",
        "",
        "| what | figure | setup |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def write_benchmarks_md(results: dict, command: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    start, end = "<!-- engine-cpu:start -->", "<!-- engine-cpu:end -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{render_markdown(results, command)}\n{end}{tail}")


def gpu_table(r: dict) -> str:
    lines = [f"GPU set on {r['machine']}", f"{'what':<44} figure"]
    for key in (
        "engine_vs_hand_loop_mlp",
        "engine_vs_hand_loop_cnn_b512",
        "engine_vs_tutorial_dataloader",
    ):
        lines.append(f"{key + ' (ratio)':<44} {r[key]['ratio']:.2f}")
    lines.append(f"{'resnet18 CIFAR-shaped img/s':<44} {r['resnet18_cifar_shaped_img_per_s']:,.0f}")
    for key in ("mnist_99", "cifar10_94"):
        v = r[key]
        text = v if isinstance(v, str) else f"{v['test_accuracy']:.4f} in {v['train_s']:.1f} s"
        lines.append(f"{key:<44} {text}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the CUDA set (bench/gpu.sh)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds / a smoke run")
    parser.add_argument("--out", type=Path, help="results file")
    args = parser.parse_args()
    results = gpu_set(args.quick) if args.gpu else cpu_set(args.quick)
    out = args.out or ROOT / ("bench/out/gpu.json" if args.gpu else "bench/results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.gpu and not args.quick and args.out is None:
        write_benchmarks_md(results, "make bench")
    print(json.dumps(results, indent=2))
    if args.gpu:
        print(gpu_table(results))  # last, so the tail of a log shows it


if __name__ == "__main__":
    main()
