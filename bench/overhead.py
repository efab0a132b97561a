"""Orchestration overhead: DAG parse time and `dvc repro` when nothing changed.

DAG parse: each sample runs in a fresh interpreter that has already imported `airflow.sdk` (as the
dag-processor has), then times executing the DAG file; reported as median seconds and as a ratio
to importing `airflow.sdk` itself. `dvc repro` no-op: median seconds of `dvc repro` on an
up-to-date pipeline, as a ratio to `dvc status`. Run after `make repro`:
`.venv/bin/python bench/overhead.py` (writes bench/out/overhead.json).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAG_FILE = ROOT / "dags" / "train_image_classifier.py"
DVC = str(Path(sys.executable).parent / "dvc")
PROBE = """
import json, os, runpy, sys, time
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # as Airflow puts the DAG folder on sys.path
t0 = time.perf_counter()
import airflow.sdk  # noqa: F401
t1 = time.perf_counter()
runpy.run_path(sys.argv[1])
t2 = time.perf_counter()
heavy = [m for m in ("torch", "mlflow", "great_expectations") if m in sys.modules]
print(json.dumps({"sdk_import": t1 - t0, "dag_parse": t2 - t1, "heavy": heavy}))
"""


def _seconds(cmd: list[str], samples: int) -> float:
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(samples: int = 7) -> dict:
    runs = []
    for _ in range(samples):
        out = subprocess.run(
            [sys.executable, "-c", PROBE, str(DAG_FILE)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    parse = statistics.median(r["dag_parse"] for r in runs)
    sdk = statistics.median(r["sdk_import"] for r in runs)
    result = {
        "dag_parse_s": round(parse, 4),
        "airflow_sdk_import_s": round(sdk, 4),
        "parse_over_sdk_import": round(parse / sdk, 3),
        "heavy_modules_imported": runs[0]["heavy"],
        "samples": samples,
    }
    status = subprocess.run([DVC, "status"], cwd=ROOT, capture_output=True, text=True).stdout
    if "up to date" in status:
        repro, stat = _seconds([DVC, "repro"], 3), _seconds([DVC, "status"], 3)
        result.update(
            dvc_repro_noop_s=round(repro, 3), dvc_repro_noop_over_status=round(repro / stat, 3)
        )
    else:
        result["dvc_repro_noop_s"] = "skipped: pipeline not up to date (run `make repro` first)"
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=7, help="fewer for a smoke run")
    main(parser.parse_args().samples)
