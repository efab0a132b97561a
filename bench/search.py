"""Search: the Optuna strategy against the grid, `lr: auto` against an lr grid, and one worker
against two, on digits in a scratch project (the same stage functions the sweep DAG maps).

1. Grid (`sweep:` of params.yaml, 8 trials x 6 epochs) vs Optuna (12 trials, Hyperband, at most
   6 epochs each): the best validation accuracy each reaches, the trial-epochs spent, wall time.
2. `train.optimizer.lr: auto` with the default recipe vs the best test accuracy over the lrs
   {1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1}, for sgd and adamw.
3. A fixed study (6 trials, 4 epochs, no pruning) by one worker process vs two at once.

`python bench/search.py` (about 10 minutes on 2 cores): writes bench/out/search.json and the
table between the search markers in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import ROOT, _env, scratch_project  # noqa: E402

OUT = ROOT / "bench" / "out"
LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
WORKER = """
import json, sys
from pipeline.config import load_config
from pipeline.settings import Settings
from pipeline.stages import search
settings = Settings.from_env()
cfg = load_config(settings.params, json.loads(sys.argv[1]))
validation = json.loads((settings.outputs / "validation.json").read_text())
search.worker(cfg, settings, validation, sys.argv[2], int(sys.argv[3]), None)
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
    finished = [c for c in children if "val_accuracy" in c.data.metrics]
    epochs = sum(len(client.get_metric_history(c.info.run_id, "val_loss")) for c in children)
    best = max(c.data.metrics["val_accuracy"] for c in finished if c.info.status == "FINISHED")
    return {"trials": len(children), "trial_epochs": epochs, "best_val_accuracy": best,
            "seconds": round(seconds, 1), "pruned": summary.get("pruned", 0)}  # fmt: skip


def lr_grid(settings, validation, config) -> dict:
    from pipeline.stages.evaluate import evaluate_stage
    from pipeline.stages.train import train_stage

    out = {}
    for optimizer in ("sgd", "adamw"):
        scores = {}
        for lr in [*LRS, "auto"]:
            cfg = config({"train.optimizer.name": optimizer, "train.optimizer.lr": lr})
            run_id = train_stage(cfg, settings, validation)["run_id"]
            scores[str(lr)] = evaluate_stage(cfg, settings, run_id)["test_accuracy"]
        best = max(v for k, v in scores.items() if k != "auto")
        gap = round(100 * (scores["auto"] - best), 2)
        out[optimizer] = {
            "test_accuracy": scores,
            "best_of_grid": best,
            "auto_minus_best_points": gap,
        }
    return out


def workers(project: Path, settings, config) -> dict:
    """Wall seconds of a fixed 6-trial study by 1 worker process and by 2 at once."""
    from pipeline.stages import search

    fixed = {"sweep.strategy": "optuna", "sweep.epochs": 4, "sweep.optuna.trials": 6,
             "sweep.optuna.pruner": "none"}  # fmt: skip
    seconds = {}
    for n in (1, 2):
        overrides = {**fixed, "sweep.optuna.study": f"workers-{n}"}
        parent = search.start(config(overrides), settings, None, new=True)
        env = {**_env(project), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(overrides), parent,
                                   str(i)], cwd=project, env=env) for i in range(n)]  # fmt: skip
        assert all(p.wait() == 0 for p in procs)
        seconds[n] = round(time.perf_counter() - start, 1)
    return {"one_worker_s": seconds[1], "two_workers_s": seconds[2],
            "ratio": round(seconds[2] / seconds[1], 2)}  # fmt: skip


def table(r: dict) -> str:
    g, o = r["grid"], r["optuna"]
    lines = [
        "| strategy | trials | trial-epochs | best val accuracy | wall |",
        "|---|---|---|---|---|",
        f"| grid | {g['trials']} | {g['trial_epochs']} | {g['best_val_accuracy']:.4f} | "
        f"{g['seconds']} s |",
        f"| optuna (Hyperband) | {o['trials']} ({o['pruned']} pruned) | {o['trial_epochs']} | "
        f"{o['best_val_accuracy']:.4f} | {o['seconds']} s |",
        "",
        "| optimizer | best test accuracy over the lr grid | `lr: auto` | difference |",
        "|---|---|---|---|",
    ]
    for name, x in r["lr_auto"].items():
        lines.append(f"| {name} | {x['best_of_grid']:.4f} | {x['test_accuracy']['auto']:.4f} | "
                     f"{x['auto_minus_best_points']:+.2f} points |")  # fmt: skip
    w = r["workers"]
    lines += ["", f"A 6-trial study: one worker {w['one_worker_s']} s, two workers at once "
              f"{w['two_workers_s']} s ({w['ratio']}x)."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="search-") as tmp:
        project = scratch_project(Path(tmp))
        pipeline(project, "data", "pull")
        pipeline(project, "validate")
        settings, validation, config = in_project(project)
        results = {
            "grid": sweep(settings, validation, config({})),
            "optuna": sweep(settings, validation, config({"sweep.strategy": "optuna"})),
            "lr_auto": lr_grid(settings, validation, config),
            "workers": workers(project, settings, config),
        }
    (OUT / "search.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    print(text)
    bench = ROOT / "BENCHMARKS.md"
    start, end = "<!-- search:start -->", "<!-- search:end -->"
    doc = bench.read_text()
    if start in doc:
        head, rest = doc.split(start, 1)
        bench.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
