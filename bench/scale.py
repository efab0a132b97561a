"""Scale: photo folders of N = 2,000 / 20,000 / 100,000 synthetic 256x256 JPEGs (10 classes,
`data.image_size=64`), then full-size MNIST and CIFAR-10 in their real file formats (synthetic
content), each through the stages in a scratch project: data pull, validate, train (1 epoch),
evaluate, register. Per stage: wall seconds, images per second and the peak RSS of the stage's
largest process (its worker processes are measured too; RUSAGE_CHILDREN's maximum). The baseline
is a single-process plain Pillow loop (open, convert, resize) over the same files, in the same run.

`make bench-scale` (or `python bench/scale.py --sizes 2000 20000`): writes bench/out/scale.json
and the table between the scale markers in BENCHMARKS.md. The photos are generated once into
bench/out/photos (about 2.5 GB for 100,000) and reused.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
BIN = Path(sys.executable).parent
PROJECT_FILES = ["params.yaml", "dvc.yaml", "data.dvc", ".dvcignore", ".gitignore", ".dvc/config",
                 ".dvc/.gitignore", "dags", "pipeline"]  # fmt: skip
CLASSES = 10
PHOTO = 256
# One epoch of a small CNN: what is measured is the data path, not the model.
TRAIN = [
    "--set",
    "train.epochs=1",
    "--set",
    "train.model.hidden=16",
    "--set",
    "train.batch_size=256",
]
# Peak memory of a command's process tree, sampled every 0.1 s: the largest VmHWM of any of its
# processes (ru_maxrss would not do: a child's starts at its parent's size) and the largest sum
# of their RSS (forked DataLoader workers share pages, so the sum overstates them).
MEASURED = """
import subprocess, sys, time
import psutil
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
root = psutil.Process(proc.pid)
largest = tree = 0
while proc.poll() is None:
    try:
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            status = open(f"/proc/{p.pid}/status").read()
            largest = max(largest, int(status.split("VmHWM:")[1].split()[0]))
        tree = max(tree, sum(p.memory_info().rss for p in procs) // 1024)
    except (psutil.Error, OSError, IndexError):
        pass
    time.sleep(0.1)
print(time.perf_counter() - start, largest, tree, proc.returncode)
"""


def photo(args) -> None:
    """A photo-like picture: a smooth two-colour gradient, a few soft shapes, a little grain."""
    path, seed = args
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:PHOTO, 0:PHOTO] / PHOTO
    a, b = rng.integers(0, 256, (2, 3))
    img = a * (1 - x[..., None]) + b * y[..., None]
    for _ in range(3):
        cx, cy, r = rng.random(3) * [1, 1, 0.3] + [0, 0, 0.05]
        inside = ((x - cx) ** 2 + (y - cy) ** 2) < r**2
        img[inside] = img[inside] * 0.4 + rng.integers(0, 256, 3) * 0.6
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    from PIL import Image

    Image.fromarray(img).save(path, quality=85)


def photos(n: int) -> Path:
    """`n` photos in 10 class folders under bench/out/photos, made once and reused."""
    folder = OUT / "photos"
    todo = []
    for i in range(n):
        path = folder / f"class{i % CLASSES}" / f"{i:06d}.jpg"
        if not path.exists():
            todo.append((path, i))
    for c in range(CLASSES):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
    if todo:
        print(f"generating {len(todo)} photos ...", file=sys.stderr)
        with multiprocessing.Pool() as pool:
            pool.map(photo, todo, chunksize=256)
    return folder


def subset(n: int) -> Path:
    """A folder of the first `n` photos (hard links: ingest never follows symbolic ones), so
    each size is its own source."""
    source, folder = photos(n), OUT / f"photos-{n}"
    if folder.exists() and any(p.is_symlink() for p in folder.glob("class0/*")):
        shutil.rmtree(folder)  # made by an earlier version of this script
    if not folder.exists():
        for c in range(CLASSES):
            (folder / f"class{c}").mkdir(parents=True)
        for i in range(n):
            name = f"class{i % CLASSES}/{i:06d}.jpg"
            os.link(source / name, folder / name)
    return folder


def ingest_only(folder: Path, n: int) -> dict:
    """`data pull`'s decode-and-write part alone (no DVC hashing or push), in its own process."""
    code = (
        "import resource, sys, time\n"
        "from pathlib import Path\n"
        "from pipeline.config import DataConfig\n"
        "from pipeline.data.sources import write_source\n"
        "start = time.perf_counter()\n"
        "write_source('imagefolder', DataConfig(source_dir=sys.argv[1], image_size=64), "
        "Path(sys.argv[2]))\n"
        "print(time.perf_counter() - start)\n"
    )
    with tempfile.TemporaryDirectory(prefix="ingest-") as out:
        cmd = [sys.executable, "-c", MEASURED, sys.executable, "-c", code, str(folder), out]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds, largest_kb, tree_kb, _ = result.stdout.split()
    return {
        "img_per_s": round(n / float(seconds)),
        "peak_rss_mb": round(int(largest_kb) / 1024),
        "peak_tree_rss_mb": round(int(tree_kb) / 1024),
    }


def pillow_baseline(folder: Path, n: int = 2000) -> float:
    """Images per second of the plain loop people write first: open, convert, resize."""
    from PIL import Image

    files = sorted(folder.rglob("*.jpg"))[:n]
    start = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            np.asarray(im.convert("RGB").resize((64, 64)))
    return len(files) / (time.perf_counter() - start)


def mnist_files(root: Path, seed: int = 0, sizes=(60_000, 10_000), jitter: int = 0) -> Path:
    """MNIST's IDX files (full size by default), stroke-like synthetic digits: a bar whose
    height is the label, moved up or down by up to `jitter` rows (> 0 makes neighbours overlap,
    so that accuracy depends on the training recipe)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, n in zip(("train", "t10k"), sizes, strict=True):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        shift = rng.integers(-jitter, jitter + 1, n)[:, None] if jitter else 0  # same files
        rows = (labels[:, None] * 2 + 4 + shift + np.arange(4)).clip(0, 27)
        images[np.arange(n)[:, None], rows, 6:22] = 255  # a bar whose height is the label
        images += rng.integers(0, 60, images.shape, dtype=np.uint8) * (images == 0)  # unique
        for name, array, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
            header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
            (raw / f"{prefix}-{name}-ubyte").write_bytes(header + array.tobytes())
    return root


def cifar_files(root: Path, seed: int = 0) -> Path:
    """CIFAR-10's python batches at full size (5 x 10,000 + 10,000), as the official files hold
    them: pickled dicts of bytes keys, uint8 rows, label lists."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, 10_000)
        data = np.repeat((labels * 25).astype(np.uint8)[:, None], 3072, axis=1)
        data = (data + rng.integers(0, 40, data.shape)).astype(np.uint8)
        batch = {"batch_label": name, "data": data, "labels": labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def scratch_project(where: Path) -> Path:
    project = where / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        src, dst = ROOT / name, project / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "scale bench"]):
        subprocess.run(["git", *args], cwd=project, check=True, env=_env(project))
    return project


def _env(project: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW"))}
    return env | {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PIPELINE_ROOT": str(project),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project}/.mlflow/mlflow.db",
        "GX_ANALYTICS_ENABLED": "false",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@localhost",
    }


def stage(project: Path, args: list[str]) -> dict:
    """Wall seconds and the peak RSS (MB) of the largest process of `pipeline <args>`."""
    cmd = [sys.executable, "-c", MEASURED, str(BIN / "pipeline"), *args]
    out = subprocess.run(cmd, cwd=project, env=_env(project), capture_output=True, text=True)
    seconds, largest_kb, tree_kb, code = out.stdout.split()
    if code != "0":
        raise RuntimeError(f"pipeline {' '.join(args)} failed ({code}):\n{out.stderr[-3000:]}")
    return {
        "seconds": round(float(seconds), 2),
        "peak_rss_mb": round(int(largest_kb) / 1024),
        "peak_tree_rss_mb": round(int(tree_kb) / 1024),
    }


def run_stages(name: str, pull: list[str], images: int, sets: list[str]) -> dict:
    """Every stage of one dataset in a fresh scratch project; img/s per stage over `images`."""
    with tempfile.TemporaryDirectory(prefix=f"scale-{name}-") as tmp:
        project = scratch_project(Path(tmp))
        rows = {"data pull": stage(project, ["data", "pull", *pull, *sets])}
        rows["validate"] = stage(project, ["validate", *sets])
        rows["train 1 epoch"] = stage(project, ["train", *sets, *TRAIN])
        rows["evaluate"] = stage(project, ["evaluate", *sets])
        rows["register"] = stage(project, ["register", *sets, "--set", "register.floor=0"])
        meta = json.loads((project / "data" / "meta.json").read_text())
    for row in rows.values():
        row["img_per_s"] = round(images / row["seconds"])
    print(f"{name}: {json.dumps(rows)}", file=sys.stderr)
    return {"images": images, "splits": meta["splits"], "stages": rows}


def class_folder(k: int, per_class: int) -> Path:
    """`k` class folders of `per_class` 8x8 grayscale PNGs each (a class is a noisy pattern),
    made once under bench/out: the cost of many classes, not of many pixels."""
    from PIL import Image

    folder = OUT / f"classes-{k}x{per_class}"
    if folder.exists():
        return folder
    rng = np.random.default_rng(k)
    for c in range(k):
        (folder / f"class {c:04d}").mkdir(parents=True)
        base = rng.integers(0, 256, (8, 8))
        for i in range(per_class):
            pixels = np.clip(base + rng.integers(-20, 21, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"class {c:04d}" / f"{i}.png")
    return folder


def class_costs(counts: list[int]) -> dict:
    """Every stage (explain too) on `k` classes of tiny images, for each `k` of `counts`: at
    least 5 a class and 250 in all (the test split needs 50 rows); seconds and peak RSS of
    each; lenet, one epoch."""
    sets = ["--set=base.dataset=imagefolder", "--set=validate.drift_max_shift=null"]
    results = {}
    for k in counts:
        with tempfile.TemporaryDirectory(prefix=f"scale-classes-{k}-") as tmp:
            project = scratch_project(Path(tmp))
            per_class = max(5, 250 // k)
            source = class_folder(k, per_class)
            pull = ["--dataset", "imagefolder", "--source-dir", str(source)]
            rows = {"data pull": stage(project, ["data", "pull", *pull, *sets])}
            rows["validate"] = stage(project, ["validate", *sets])
            train = ["--set=train.model.name=lenet", "--set=train.epochs=1"]
            rows["train 1 epoch"] = stage(project, ["train", *sets, *train])
            for name in ("evaluate", "explain"):
                rows[name] = stage(project, [name, *sets])
            rows["register"] = stage(project, ["register", *sets, "--set=register.floor=0"])
        print(f"classes {k}: {json.dumps(rows)}", file=sys.stderr)
        results[f"{k:,} x {per_class}"] = rows
    return results


def classes_table(results: dict) -> str:
    stages = list(next(iter(results.values())))
    lines = ["| classes x images each | " + " | ".join(stages) + " |"]
    lines.append("|---|" + "---|" * len(stages))
    for name, rows in results.items():
        cells = [f"{rows[s]['seconds']:.1f} s, {rows[s]['peak_rss_mb']:,} MB" for s in stages]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fingerprint_cost(folder: Path, n: int) -> dict:
    """The source fingerprint (list + md5 of every file, what decides whether a pull is a new
    version) against the ingest alone, in one run; the page cache dropped by neither (both read
    the same files, so the second reads from memory: the fingerprint goes first)."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pipeline.data.fingerprint import fingerprint\n"
        "from pipeline.data.sources.imagefolder import list_files\n"
        "start = time.perf_counter()\n"
        "root = Path(sys.argv[1]).resolve()\n"
        "fingerprint(root, list_files(root).files)\n"
        "print(time.perf_counter() - start)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    seconds = float(out.stdout.split()[-1])
    ingest = ingest_only(folder, n)
    return {
        "images": n,
        "fingerprint_s": round(seconds, 2),
        "fingerprint_img_per_s": round(n / seconds),
        "ingest_img_per_s": ingest["img_per_s"],
        "fingerprint_over_ingest_time": round(ingest["img_per_s"] / (n / seconds), 3),
    }


def measure_baseline(results: dict, largest: int) -> dict:
    """The plain Pillow loop, and the ingest alone, against `data pull` of the largest folder;
    and what the source fingerprint costs there."""
    baseline = pillow_baseline(subset(largest))
    pull = results["datasets"][f"photos {largest:,}"]["stages"]["data pull"]["img_per_s"]
    ingest = ingest_only(subset(largest), largest)
    return {
        "img_per_s": baseline,
        "pull_ratio": pull / baseline,
        "ingest": ingest,
        "ingest_ratio": ingest["img_per_s"] / baseline,
        "fingerprint": fingerprint_cost(subset(largest), largest),
    }


def table(results: dict) -> str:
    stages = ["data pull", "validate", "train 1 epoch", "evaluate", "register"]
    lines = [
        "| dataset | images | " + " | ".join(stages) + " |",
        "|---|---|" + "---|" * len(stages),
    ]
    for name, r in results["datasets"].items():
        cells = [
            f"{s['seconds']:.1f} s, {s['img_per_s']:,} img/s, {s['peak_rss_mb']:,} MB"
            for s in (r["stages"][k] for k in stages)
        ]
        lines.append(f"| {name} | {r['images']:,} | " + " | ".join(cells) + " |")
    b = results["baseline"]
    lines.append("")
    lines.append(
        f"Plain single-process Pillow loop (open, convert, resize to 64x64) over the same "
        f"photos: {b['img_per_s']:,.0f} img/s. The ingest alone (probe, decode in "
        f"{results['cpus']} worker processes, write data/; no DVC) on the largest folder: "
        f"{b['ingest']['img_per_s']:,} img/s, {b['ingest_ratio']:.2f}x that, peak RSS "
        f"{b['ingest']['peak_rss_mb']} MB; the whole `data pull` (with `dvc add` and `dvc push` "
        f"of the result): {b['pull_ratio']:.2f}x."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000, 100_000])
    parser.add_argument("--no-builtin", action="store_true", help="skip MNIST and CIFAR-10")
    parser.add_argument(
        "--no-photos", action="store_true", help="keep the photo rows of bench/out/scale.json"
    )
    parser.add_argument(
        "--fingerprint",
        type=int,
        metavar="N",
        help="only the source fingerprint's cost at N photos",
    )
    parser.add_argument(
        "--classes",
        type=int,
        nargs="+",
        metavar="K",
        help="only the cost of K classes (5 tiny images each) per stage",
    )
    parser.add_argument(
        "--quick", action="store_true", help="500 photos, no built-in sets: a smoke run"
    )
    args = parser.parse_args()
    if args.classes:
        results = class_costs(args.classes)
        (OUT / "scale-classes.json").write_text(json.dumps(results, indent=2) + "\n")
        print(classes_table(results))
        return
    if args.quick:  # bench/out/scale-quick.json; BENCHMARKS.md keeps the real figures
        args.sizes, args.no_builtin = [500], True  # the test split needs 50 rows to validate
    if args.fingerprint:
        print(json.dumps(fingerprint_cost(subset(args.fingerprint), args.fingerprint), indent=2))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"datasets": {}, "cpus": os.cpu_count()}
    photo_sets = ["--set=base.dataset=imagefolder", "--set=data.image_size=64"]
    photo_sets += ["--set=validate.drift_max_shift=null"]
    if args.no_photos:
        results = json.loads((OUT / "scale.json").read_text())
    for n in [] if args.no_photos else args.sizes:
        folder = subset(n)
        pull = ["--dataset", "imagefolder", "--source-dir", str(folder)]
        results["datasets"][f"photos {n:,}"] = run_stages(f"photos-{n}", pull, n, photo_sets)
    largest = max(args.sizes)
    saved = OUT / ("scale-quick.json" if args.quick else "scale.json")
    if not args.no_photos:
        results["baseline"] = measure_baseline(results, largest)
        saved.write_text(json.dumps(results, indent=2) + "\n")

    if not args.no_builtin:
        with tempfile.TemporaryDirectory(prefix="scale-raw-") as raw:
            sources = {
                "mnist": mnist_files(Path(raw) / "m"),
                "cifar10": cifar_files(Path(raw) / "c"),
            }
            for name, source in sources.items():
                pull = [
                    "--dataset",
                    name,
                    "--source-dir",
                    str(source),
                    "--set",
                    "data.download=false",
                ]
                sets = [f"--set=base.dataset={name}"] + [
                    f"--set=validate.{key}=null"
                    for key in ("drift_max_shift", "max_share_at_0", "max_share_at_255")
                ]
                results["datasets"][name] = run_stages(
                    name, pull, 70_000 if name == "mnist" else 60_000, sets
                )
    saved.write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    print(text)
    if args.quick:
        return
    bench = ROOT / "BENCHMARKS.md"
    start, end = "<!-- scale:start -->", "<!-- scale:end -->"
    doc = bench.read_text()
    if start in doc:
        head, rest = doc.split(start, 1)
        doc = head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1]
        bench.write_text(doc)


if __name__ == "__main__":
    main()
