"""What the MLflow model's wrapper costs per image against the bare network, in one run.

The champion of the project's registry (run `make repro` first) is loaded twice: as the bare
network (`load_weights`: the same weights, float32 in, logits out) and as the MLflow model
(`mlflow.pyfunc.load_model`: the input contract's checks, the class names and probabilities in
a DataFrame; for files, the decoding too). Each is timed on the test split as uint8 pixels, and
the pyfunc also on the same images as base64 PNG files, at batch 1 and batch 256; medians of
`--repeats` passes, microseconds per image, and the ratio to the bare network.
`.venv/bin/python bench/serving.py` writes bench/out/serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "serving.json"


def _per_image_us(fn, batches: list, repeats: int) -> float:
    fn(batches[0])  # warm-up: first-call allocations, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / sum(len(b) for b in batches) * 1e6


def main(repeats: int, images: int) -> dict:
    import mlflow
    import torch
    from mlflow import MlflowClient

    from pipeline.tracking.weights import load_weights, png_base64

    mlflow.set_tracking_uri(
        os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT}/.mlflow/mlflow.db")
    )
    version = MlflowClient().get_model_version_by_alias("image-classifier", "champion")
    net, spec = load_weights(version.run_id)
    served = mlflow.pyfunc.load_model(f"models:/image-classifier/{version.version}")
    pixels = np.load(ROOT / "data" / "test_images.npy")[:images]
    files = np.array([png_base64(image) for image in pixels], dtype=object)

    @torch.no_grad()
    def bare(batch: np.ndarray):
        return net(torch.from_numpy(batch.astype(np.float32)))

    table = {}
    for size in (1, 256):
        cut = [slice(i, i + size) for i in range(0, len(pixels), size)]
        if size == 1:
            cut = cut[:128]  # batch 1: 128 calls are plenty for a median
        arrays, encoded = [pixels[c] for c in cut], [files[c] for c in cut]
        base = _per_image_us(bare, arrays, repeats)
        table[f"batch_{size}"] = {
            "bare_network_us": round(base, 1),
            "pyfunc_uint8_us": round(_per_image_us(served.predict, arrays, repeats), 1),
            "pyfunc_png_files_us": round(_per_image_us(served.predict, encoded, repeats), 1),
        }
        row = table[f"batch_{size}"]
        row["uint8_over_bare"] = round(row["pyfunc_uint8_us"] / base, 2)
        row["files_over_bare"] = round(row["pyfunc_png_files_us"] / base, 2)
    result = {
        "model": f"image-classifier/{version.version}",
        "input_shape": list(spec.shape),
        "images": len(pixels),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        **table,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=256 * 4)
    args = parser.parse_args()
    print(json.dumps(main(args.repeats, args.images), indent=2))
