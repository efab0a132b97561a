#!/usr/bin/env bash
# The fixed cost of `pipeline train` (wall minus the epoch) before and after a change,
# interleaved with the tutorial loop, 3 rounds, on an MNIST project that is pulled and validated:
#   git worktree add /tmp/before <commit> && bench/fixed_cost.sh /tmp/before <project> <mnist dir>
# Each line: which, wall seconds (from outside: interpreter start, imports and exit included),
# the epoch's seconds. `python -m pipeline.cli`: the code under test, whatever `pipeline` runs.
set -euo pipefail
BEFORE=$1 PROJECT=$2 FILES=$3
HERE=$(cd "$(dirname "$0")/.." && pwd)
source "$HERE/.venv/bin/activate"
export PIPELINE_ROOT=$PROJECT MLFLOW_TRACKING_URI=sqlite:///$PROJECT/.mlflow/mlflow.db
export GX_ANALYTICS_ENABLED=false
cd /tmp
for _ in 1 2 3; do
  for which in before after; do
    if [ "$which" = before ]; then code=$BEFORE params=(--params "$BEFORE/params.yaml")
    else code=$HERE params=(); fi
    start=$(date +%s.%N)
    PYTHONPATH=$code python -m pipeline.cli train "${params[@]}" --preset seed-mlp-mnist \
      --set train.epochs=1 > /dev/null 2> /tmp/fixed-cost.err
    end=$(date +%s.%N)
    epoch=$(grep -oE "\(([0-9.]+)s\)$" /tmp/fixed-cost.err | tr -d '()s' | tail -1)
    echo "$which wall $(echo "$end - $start" | bc) epoch $epoch"
  done
  start=$(date +%s.%N)
  epoch=$(python "$HERE/bench/tutorial_mnist.py" "$FILES" 1 | grep -oE '"epoch_seconds": \[[0-9.]+' | grep -oE '[0-9.]+$')
  end=$(date +%s.%N)
  echo "tutorial wall $(echo "$end - $start" | bc) epoch $epoch"
done
