"""Search: the Optuna strategy against the grid, `lr: auto` against an lr grid, and one worker
against two, in a scratch project (the same stage functions the sweep DAG maps).

1. Grid vs Optuna: the trial each chooses (both: the lowest last-epoch val_loss), its validation
   accuracy and its test accuracy, the trial-epochs spent, wall time.
   Two grids: the `sweep:` block of params.yaml (2 optimizers x 2 schedules x 2 hand-picked lrs,
   8 trials x 6 epochs), and the same over the lr range the search covers, {1e-4 ... 1e-1}
   (28 trials x 6 epochs). Optuna: the default space, 12 trials of at most 6 epochs, pruned by
   Hyperband (the default) and by successive halving, and 24 trials with successive halving (aimed
   at a third of the lr-range grid's trial-epochs). On digits, then on MNIST-format files (the
   scale benchmark's synthetic digits, 10,000 + 2,000 rows, each bar moved by up to a row so that
   neighbouring classes overlap and the recipe matters; a small CNN, `train.model.hidden=32`).
2. `train.optimizer.lr: auto` with the default recipe vs the best test accuracy over the lrs
   {1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1}, for sgd and adamw (digits), with the lr each chose.
3. A fixed study (6 trials, 4 epochs, no pruning) by one worker process vs two at once.

`python bench/search.py` (about 21 minutes on 2 cores, 55 on a slow day of this machine;
`--only digits` or `--only mnist` re-runs one, `--strategy NAME` with it only that row): writes
bench/out/search.json and the table between the search markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import ROOT, _env, mnist_files, scratch_project  # noqa: E402

OUT = ROOT / "bench" / "out"
# The scratch project's params.yaml for the MNIST-format run: the generated files, and the
# checks that flag them as unlike photos (a constant background, no champion to drift from) off.
MNIST = {
    "base": {"dataset": "mnist"},
    "data": {"download": False},
    "validate": {"drift_max_shift": None, "max_share_at_0": None, "max_share_at_255": None},
    "train": {"model": {"hidden": 32}},
}
LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
OPTUNA = {"sweep.strategy": "optuna"}
STRATEGIES = {  # name in the table: overrides of params.yaml
    "grid": {},
    "grid, lr range": {"sweep.lrs": LRS},
    "optuna, hyperband": OPTUNA | {"sweep.optuna.study": "hyperband"},
    "optuna, successive halving": OPTUNA | {"sweep.optuna.pruner": "successive_halving",
                                            "sweep.optuna.study": "halving"},
    # twice the trials, aimed at a third of the lr-range grid's 168 trial-epochs
    "optuna, successive halving, 24 trials": OPTUNA | {"sweep.optuna.pruner": "successive_halving",
                                                       "sweep.optuna.trials": 24,
                                                       "sweep.optuna.study": "halving-24"},
}  # fmt: skip
WORKER = """
import json, sys
from pipeline.config import load_config
from pipeline.settings import Settings
from pipeline.context import RunContext
from pipeline.stages.sweep import search
settings = Settings.from_env()
cfg = load_config(settings.params, json.loads(sys.argv[1]))
validation = json.loads((settings.outputs / "validation.json").read_text())
search.worker(cfg, settings, validation, sys.argv[2], int(sys.argv[3]), RunContext())
"""


def pipeline(project: Path, *args: str) -> None:
    subprocess.run(
        [str(Path(sys.executable).parent / "pipeline"), *args],
        cwd=project, env=_env(project), capture_output=True, check=True,
    )  # fmt: skip


def in_project(project: Path):
    """This process pointed at the scratch project, as the DAG's tasks are."""
    os.environ.update(_env(project))
    from pipeline.config import load_config
    from pipeline.settings import Settings

    settings = Settings.from_env(project)
    validation = json.loads((settings.outputs / "validation.json").read_text())
    return settings, validation, lambda overrides: load_config(settings.params, overrides)


def sweep(settings, validation, cfg) -> dict:
    """The sweep DAG's tasks in order, in this process: start, every item, finish."""
    from mlflow import MlflowClient

    from pipeline.stages import sweep

    start = time.perf_counter()
    started = sweep.start(cfg, settings, None, new=True)
    results = [sweep.trial_stage(cfg, settings, validation, started["parent"], item, None)
               for item in started["items"]]  # fmt: skip
    summary = sweep.finish(cfg, settings, started["parent"], results)
    seconds = time.perf_counter() - start
    client = MlflowClient()
    children = client.search_runs(
        [client.get_run(started["parent"]).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{started['parent']}'",
    )
    epochs = sum(len(client.get_metric_history(c.info.run_id, "val_loss")) for c in children)
    timing = "system/epoch_seconds"
    in_epochs = sum(m.value for c in children
                    for m in client.get_metric_history(c.info.run_id, timing))  # fmt: skip
    # The trial the sweep chose (both strategies: the lowest val_loss), then its test accuracy:
    # the test split chose nothing, so that figure is free of the max-of-many-noisy-trials bias
    # the chosen trial's validation figures carry.
    chosen = client.get_run(summary["best"]["run_id"]).data.metrics
    return {"trials": len(children), "trial_epochs": epochs,
            "chosen_val_loss": chosen["val_loss"],
            "chosen_val_accuracy": chosen["val_accuracy"],
            "its_test_accuracy": chosen["test_accuracy"],
            "seconds": round(seconds, 1), "pruned": summary.get("pruned", 0),
            # what a trial costs beyond its epochs: set-up, checks, tracking, saving
            "fixed_per_trial_s": round((seconds - in_epochs) / len(children), 2)}  # fmt: skip


def lr_grid(settings, validation, config) -> dict:
    from mlflow import MlflowClient

    from pipeline.stages.evaluate import evaluate_stage
    from pipeline.stages.train import train_stage

    out = {}
    for optimizer in ("sgd", "adamw"):
        scores, runs = {}, {}
        for lr in [*LRS, "auto"]:
            cfg = config({"train.optimizer.name": optimizer, "train.optimizer.lr": lr})
            runs[str(lr)] = run_id = train_stage(cfg, settings, validation)["run_id"]
            scores[str(lr)] = evaluate_stage(cfg, settings, run_id)["test_accuracy"]
        auto_run = MlflowClient().get_run(runs["auto"])
        auto_lr = float(auto_run.data.params["train.optimizer.lr"])
        best_lr = max((k for k in scores if k != "auto"), key=scores.__getitem__)
        out[optimizer] = {
            "test_accuracy": scores,
            "best_of_grid": scores[best_lr],
            "best_lr": float(best_lr),
            "auto_lr": auto_lr,  # what the range test resolved `auto` to
            "auto_minus_best_points": round(100 * (scores["auto"] - scores[best_lr]), 2),
        }
    return out


def workers(project: Path, settings, config) -> dict:
    """Wall seconds of a fixed 6-trial study by 1 worker process and by 2 at once, and the CPU
    seconds the workers used (more than the wall time: torch, MLflow and SQLite use threads)."""
    import resource

    from pipeline.context import RunContext
    from pipeline.stages.sweep import search

    fixed = {"sweep.strategy": "optuna", "sweep.epochs": 4, "sweep.optuna.trials": 6,
             "sweep.optuna.pruner": "none"}  # fmt: skip
    out = {}
    for n in (1, 2):
        overrides = {**fixed, "sweep.optuna.study": f"workers-{n}"}
        parent = search.start(config(overrides), settings, RunContext(), new=True)["parent"]
        env = {**_env(project), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(overrides), parent,
                                   str(i)], cwd=project, env=env) for i in range(n)]  # fmt: skip
        assert all(p.wait() == 0 for p in procs)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        out[n] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    return {"one_worker": out[1], "two_workers": out[2],
            "ratio": round(out[2]["wall_s"] / out[1]["wall_s"], 2)}  # fmt: skip


def table(results: dict) -> str:
    lines = [
        "| data | strategy | trials | trial-epochs | chosen trial: val loss / val accuracy "
        "| its test accuracy | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for data, r in sorted(results.items()):  # digits, mnist
        full = r["grid, lr range"]
        for name, x in r.items():
            if name not in STRATEGIES:
                continue
            trials, epochs = f"{x['trials']}", f"{x['trial_epochs']}"
            accuracy = f"{x['chosen_val_loss']:.4f} / {x['chosen_val_accuracy']:.4f}"
            test = f"{x['its_test_accuracy']:.4f}"
            if name.startswith("optuna"):  # against the grid over the same lr range
                gap = 100 * (x["chosen_val_accuracy"] - full["chosen_val_accuracy"])
                test_gap = 100 * (x["its_test_accuracy"] - full["its_test_accuracy"])
                trials += f" ({x['pruned']} pruned)"
                epochs += f" ({x['trial_epochs'] / full['trial_epochs']:.2f}x)"
                accuracy += f" ({gap:+.2f} points)"
                test += f" ({test_gap:+.2f} points)"
            lines.append(f"| {data} | {name} | {trials} | {epochs} | {accuracy} | {test} | "
                         f"{x['seconds']} s |")  # fmt: skip
    digits = results.get("digits")
    if digits:
        lines += [
            "",
            "| optimizer (digits) | best test accuracy, lr grid (its lr) | `lr: auto` (the lr "
            "it resolved to) | difference |",
            "|---|---|---|---|",
        ]
        for name, x in digits["lr_auto"].items():
            lines.append(f"| {name} | {x['best_of_grid']:.4f} ({x['best_lr']:g}) | "
                         f"{x['test_accuracy']['auto']:.4f} ({x['auto_lr']:.3g}) | "
                         f"{x['auto_minus_best_points']:+.2f} points |")  # fmt: skip
    lines += [
        "",
        "| data | a 6-trial study (4 epochs each, no pruning) | wall | CPU |",
        "|---|---|---|---|",
    ]
    for data, r in sorted(results.items()):
        w = r["workers"]
        for label, x in (
            ("one worker (2 threads)", w["one_worker"]),
            (f"two workers at once (1 thread each): {w['ratio']}x", w["two_workers"]),
        ):
            lines.append(f"| {data} | {label} | {x['wall_s']} s | {x['cpu_s']} s |")  # fmt: skip
    return "\n".join(lines)


def set_params(project: Path, values: dict) -> None:
    import yaml

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict):
                merge(into.setdefault(key, {}), value)
            else:
                into[key] = value

    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    merge(params, values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def bench(data: str, tmp: Path, strategies: list[str]) -> dict:
    project = scratch_project(tmp)
    if data == "mnist":
        source = mnist_files(tmp / "raw", sizes=(10_000, 2_000), jitter=1)
        set_params(project, MNIST | {"data": {**MNIST["data"], "source_dir": str(source)}})
    pipeline(project, "data", "pull")
    pipeline(project, "validate")
    settings, validation, config = in_project(project)
    results = {}
    for name in strategies or STRATEGIES:
        results[name] = sweep(settings, validation, config(STRATEGIES[name]))
    if strategies:  # re-running some rows only
        return results
    if data == "digits":
        results["lr_auto"] = lr_grid(settings, validation, config)
    results["workers"] = workers(project, settings, config)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["digits", "mnist"], help="keep the other's figures")
    parser.add_argument("--strategy", action="append", choices=list(STRATEGIES),
                        help="with --only: re-run these rows alone, keep the rest")  # fmt: skip
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    saved = OUT / "search.json"
    if not args.only:  # each dataset in a process of its own: MLflow and env point at its project
        saved.unlink(missing_ok=True)
        for data in ("digits", "mnist"):
            subprocess.run([sys.executable, __file__, "--only", data], check=True)
        return
    results = json.loads(saved.read_text()) if saved.exists() else {}
    with tempfile.TemporaryDirectory(prefix=f"search-{args.only}-") as tmp:
        fresh = bench(args.only, Path(tmp), args.strategy or [])
    results[args.only] = results.get(args.only, {}) | fresh if args.strategy else fresh
    saved.write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    print(text)
    doc_path = ROOT / "BENCHMARKS.md"
    start, end = "<!-- search:start -->", "<!-- search:end -->"
    doc = doc_path.read_text()
    if start in doc:
        head, rest = doc.split(start, 1)
        doc_path.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
