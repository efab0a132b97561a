#!/usr/bin/env bash
# The Airflow metadata DB as the DAGs need it: migrated, with the pools they name
# (dags/dag_support.py): `promotion` (one promotion at a time) and `gpu` (one training per GPU,
# 1 on CPU; GPU_SLOTS overrides what nvidia-smi counts). Idempotent. Run by `make run` / `make up`,
# the tests' `airflow` template and the compose file's airflow-init service.
set -euo pipefail

gpus=${GPU_SLOTS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
airflow db migrate
airflow pools set promotion 1 "one model promotion at a time"
airflow pools set gpu "$((gpus > 0 ? gpus : 1))" "one training per GPU (1 on CPU)"
