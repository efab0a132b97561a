#!/usr/bin/env bash
# `make up` / `make down`: the Airflow components (api-server with the UI, scheduler,
# dag-processor, triggerer; LocalExecutor on the SQLite metadata DB) and an MLflow server (UI)
# on the stores `make run` uses. Each runs in its own session, logs and pid files in $RUN_DIR,
# so `down` stops exactly what `up` started and `up` twice starts nothing twice.
# The same script runs the production topology when the environment says so (see infra/README.md):
# AIRFLOW__CORE__EXECUTOR=CeleryExecutor adds an `airflow celery worker`; MLFLOW_BACKEND_STORE_URI
# and MLFLOW_ARTIFACTS_DESTINATION give the MLflow server its own stores while the tasks talk to it
# over MLFLOW_TRACKING_URI=http://...
# MLflow runs its basic-auth app: anonymous requests get 401; the admin's generated password is
# in $MLFLOW_AUTH_DIR/admin-password (pointed at, never printed) and reaches the server and the
# Airflow components through the environment, never argv. MLFLOW_AUTH=none: the open server.
set -euo pipefail
umask 077  # logs, pid files, passwords and the stores made here: the user's own (600/700)

RUN_DIR=${RUN_DIR:-$PWD/.run}
MLFLOW_AUTH=${MLFLOW_AUTH:-basic}
MLFLOW_AUTH_DIR=${MLFLOW_AUTH_DIR:-$PWD/.mlflow-auth}
AIRFLOW_PORT=${AIRFLOW_PORT:-8080}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
export AIRFLOW__CORE__EXECUTOR=${AIRFLOW__CORE__EXECUTOR:-LocalExecutor}
export AIRFLOW__API__BASE_URL=${AIRFLOW__API__BASE_URL:-http://127.0.0.1:$AIRFLOW_PORT}
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://127.0.0.1:$AIRFLOW_PORT/execution/}
COMPONENTS="api-server scheduler dag-processor triggerer mlflow"
[ "$AIRFLOW__CORE__EXECUTOR" = CeleryExecutor ] && COMPONENTS="$COMPONENTS worker"

command_of() {
  case $1 in
    api-server) echo "airflow api-server --host 127.0.0.1 --port $AIRFLOW_PORT" ;;
    # The store's URI (a database password) goes by MLFLOW_BACKEND_STORE_URI, not argv (ps).
    mlflow) echo "mlflow server --host 127.0.0.1 --port $MLFLOW_PORT --workers 1 \
      ${MLFLOW_ARTIFACTS_DESTINATION:+--artifacts-destination $MLFLOW_ARTIFACTS_DESTINATION} \
      $([ "$MLFLOW_AUTH" = none ] || echo --app-name basic-auth)" ;;
    worker) echo "airflow celery worker --concurrency ${CELERY_CONCURRENCY:-2}" ;;
    *) echo "airflow $1" ;;
  esac
}

alive() { [ -f "$RUN_DIR/$1.pid" ] && kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }

wait_http() {  # url, component: until it answers, or its process died, or 120 s passed
  for _ in $(seq 1 240); do
    curl -sf -o /dev/null "$1" && return 0
    alive "$2" || { echo "$2 exited; see $RUN_DIR/$2.log" >&2; tail -5 "$RUN_DIR/$2.log" >&2; return 1; }
    sleep 0.5
  done
  echo "$2 did not answer at $1; see $RUN_DIR/$2.log" >&2
  return 1
}

secret() {  # file: a random secret made once, readable by the user alone
  [ -s "$1" ] || python -c 'import secrets; print(secrets.token_urlsafe(24))' >"$1"
  chmod 600 "$1"
}

# Airflow's simple auth manager prints a password it generates into the api-server's log; one
# made here first is found, and never printed.
airflow_login() {
  local passwords="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
  [ -s "$passwords" ] || python -c 'import json, secrets
print(json.dumps({"admin": secrets.token_urlsafe(12)}))' >"$passwords"
  chmod 700 "$AIRFLOW_HOME" && chmod 600 "$passwords" "$AIRFLOW_HOME"/*.db 2>/dev/null || true
}

mlflow_auth() {
  export MLFLOW_BACKEND_STORE_URI=${MLFLOW_BACKEND_STORE_URI:-$MLFLOW_TRACKING_URI}
  case $MLFLOW_BACKEND_STORE_URI in  # a SQLite store: its folder the user's alone
    sqlite:///*) local db=${MLFLOW_BACKEND_STORE_URI#sqlite:///}
      mkdir -p "$(dirname "$db")" && chmod 700 "$(dirname "$db")" ;;
  esac
  [ "$MLFLOW_AUTH" = none ] && return 0
  mkdir -p "$MLFLOW_AUTH_DIR" && chmod 700 "$MLFLOW_AUTH_DIR"
  secret "$MLFLOW_AUTH_DIR/admin-password"
  secret "$MLFLOW_AUTH_DIR/flask-secret-key"
  printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = %s\nadmin_username = admin\n' \
    "${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$MLFLOW_AUTH_DIR/users.db}" >"$MLFLOW_AUTH_DIR/basic_auth.ini"
  export MLFLOW_AUTH_CONFIG_PATH=$MLFLOW_AUTH_DIR/basic_auth.ini
  MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$MLFLOW_AUTH_DIR/flask-secret-key")
  MLFLOW_AUTH_ADMIN_PASSWORD=$(cat "$MLFLOW_AUTH_DIR/admin-password")
  export MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_AUTH_ADMIN_PASSWORD
  # The tasks' MLflow client, when they talk to this server (MLFLOW_TRACKING_URI=http://...)
  export MLFLOW_TRACKING_USERNAME=${MLFLOW_TRACKING_USERNAME:-admin}
  export MLFLOW_TRACKING_PASSWORD=${MLFLOW_TRACKING_PASSWORD:-$MLFLOW_AUTH_ADMIN_PASSWORD}
}

up() {
  mkdir -p "$RUN_DIR" && chmod 700 "$RUN_DIR"
  airflow_login
  mlflow_auth
  for c in $COMPONENTS; do
    if alive "$c"; then
      echo "$c: already running (pid $(cat "$RUN_DIR/$c.pid"))"
      continue
    fi
    # shellcheck disable=SC2046
    setsid $(command_of "$c") >"$RUN_DIR/$c.log" 2>&1 < /dev/null &
    echo $! >"$RUN_DIR/$c.pid"
    echo "$c: started (pid $!, log $RUN_DIR/$c.log)"
  done
  wait_http "http://127.0.0.1:$AIRFLOW_PORT/api/v2/monitor/health" api-server
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" mlflow
  local passwords="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
  echo
  echo "Airflow UI  http://127.0.0.1:$AIRFLOW_PORT   user admin, password: cat $passwords"
  local login="user admin, password: cat $MLFLOW_AUTH_DIR/admin-password"
  [ "$MLFLOW_AUTH" = none ] && login="open to anyone who can reach it (MLFLOW_AUTH=none)"
  echo "MLflow UI   http://127.0.0.1:$MLFLOW_PORT/#/experiments?workflowType=machine_learning   $login"
  echo "Stop both:  make down"
}

down() {
  for pidfile in "$RUN_DIR"/*.pid; do
    [ -f "$pidfile" ] || continue
    local c
    c=$(basename "$pidfile" .pid)
    local pid
    pid=$(cat "$RUN_DIR/$c.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || true  # the whole session: gunicorn/uvicorn workers too
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      echo "$c: stopped"
    fi
    rm -f "$RUN_DIR/$c.pid"
  done
}

case ${1:-} in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
