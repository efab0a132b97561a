#!/usr/bin/env bash
# The GPU benchmark set (one CUDA GPU, no network, under 8 minutes):
#   engine vs hand-written loop and vs the tutorial DataLoader loop (throughput ratios),
#   ResNet-18 throughput on CIFAR-shaped tensors, and MNIST to 99 % / CIFAR-10 to 94 % test
#   accuracy when the real files are mounted:
#   PIPELINE_BENCH_DATA=/data bench/gpu.sh   (/data/mnist/MNIST/raw/*-ubyte,
#                                             /data/cifar10/cifar-10-batches-py/*)
# Full figures: bench/out/gpu.json; progress: bench/out/gpu.log; a short table is printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p bench/out
timeout 470 "$PY" bench/engine.py --gpu --out bench/out/gpu.json "$@" 2> bench/out/gpu.log \
  | tail -n 8
