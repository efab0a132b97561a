"""DAG parse time: what the dag-processor pays per parse of dags/train_image_classifier.py.

Each sample runs in a fresh interpreter that has already imported `airflow.sdk` (as the
dag-processor has), then times executing the DAG file. Reported: median seconds and the ratio to
the time of importing `airflow.sdk` itself. Run: `.venv/bin/python bench/dag_parse.py`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

DAG_FILE = Path(__file__).resolve().parents[1] / "dags" / "train_image_classifier.py"
PROBE = """
import json, runpy, sys, time
t0 = time.perf_counter()
import airflow.sdk  # noqa: F401
t1 = time.perf_counter()
runpy.run_path(sys.argv[1])
t2 = time.perf_counter()
heavy = [m for m in ("torch", "mlflow", "great_expectations") if m in sys.modules]
print(json.dumps({"sdk_import": t1 - t0, "dag_parse": t2 - t1, "heavy": heavy}))
"""


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
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
