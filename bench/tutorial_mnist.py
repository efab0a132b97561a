"""The classic PyTorch MNIST tutorial loop, hand-written, as the baseline `pipeline train
--preset seed-mlp-mnist` is held to: MLP 784-128-10, SGD lr 0.01 momentum 0.9, batch 64,
10 epochs, normalized with MNIST's mean and std, then one pass over the test split.

It reads the IDX files itself (gzip or not, in the folder given) and keeps the tensors in
memory, slicing shuffled batches: the fastest honest form of the tutorial, and what its
start-up costs (importing torch, reading the files) are. Usage:
`python bench/tutorial_mnist.py DIR [EPOCHS]`; prints a JSON line with the test accuracy, the
epoch seconds and the wall time since the interpreter started.
"""

import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def idx(folder: Path, stem: str) -> np.ndarray:
    path = next(p for p in sorted(folder.iterdir()) if p.name.startswith(stem))
    raw = (gzip.open if path.name.endswith(".gz") else open)(path, "rb").read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", ndim, 4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def tensors(folder: Path, prefix: str):
    images = torch.from_numpy(idx(folder, f"{prefix}-images").astype(np.float32) / 255)
    labels = torch.from_numpy(idx(folder, f"{prefix}-labels").astype(np.int64))
    return (images - 0.1307) / 0.3081, labels


def main(folder: Path, epochs: int) -> dict:
    torch.manual_seed(0)
    x, y = tensors(folder, "train")
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            batch = order[i : i + 64]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds.append(round(time.perf_counter() - start, 3))
    tx, ty = tensors(folder, "t10k")
    with torch.no_grad():
        accuracy = (model(tx).argmax(1) == ty).float().mean().item()
    return {"test_accuracy": round(accuracy, 4), "epoch_seconds": seconds}


if __name__ == "__main__":
    result = main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 10)
    # wall since the interpreter started: imports included, as a user's `time python ...`
    import psutil

    started = psutil.Process().create_time()
    print(json.dumps({**result, "wall_s": round(time.time() - started, 2)}))
