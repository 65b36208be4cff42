#!/usr/bin/env bash
# `make ui`: a Prefect server, an MLflow server (sqlite backend, artifacts in the repo) and the pipeline
# deployments (`python -m flows serve`), on 127.0.0.1. Prints the URLs; Ctrl-C stops all three.
# Ports: PREFECT_PORT (default 4200), MLFLOW_PORT (default 5000). Logs: .prefect/ui-*.log
# UI_HOST=0.0.0.0 binds both servers on every interface so other machines can use them (UI_PUBLIC_HOST, default
# this machine's hostname, is the name they reach it by); SERVE=0 skips the local deployments (a worker runs them).
# The Prefect UI is told its server's own address (PREFECT_UI_API_URL), so any port works.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
UI_HOST="${UI_HOST:-127.0.0.1}"
if [[ "$UI_HOST" == "0.0.0.0" ]]; then UI_PUBLIC_HOST="${UI_PUBLIC_HOST:-$(hostname)}"; else UI_PUBLIC_HOST="$UI_HOST"; fi
SERVE="${SERVE:-1}"
CHECK_HOST="$UI_HOST"; [[ "$UI_HOST" == "0.0.0.0" ]] && CHECK_HOST=127.0.0.1
MLFLOW_BACKEND="${MLFLOW_BACKEND:-sqlite:///$ROOT/mlflow.db}"
MLFLOW_ARTIFACTS="${MLFLOW_ARTIFACTS:-$ROOT/mlartifacts}"  # or s3://bucket/prefix, gs://..., with the extra installed
# MLflow's default of 4 server processes restarts them when a loaded machine answers their pings late, dropping
# requests meanwhile; one is plenty for a few clients (MLFLOW_WORKERS=4 for a busy shared server)
MLFLOW_WORKERS="${MLFLOW_WORKERS:-1}"
LOGS="$ROOT/.prefect"
mkdir -p "$LOGS"
export DVC_NO_ANALYTICS=true PREFECT_HOME="$LOGS" PREFECT_SERVER_ANALYTICS_ENABLED=false
export PATH="$ROOT/.venv/bin:$PATH"

pids=()
descendants() {  # every process below $1 (found before stopping: a killed parent's children are re-parented)
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}
alive() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
stop() {  # the serve process first (it talks to the Prefect server while stopping), then the servers
  trap - INT TERM EXIT
  echo; echo "stopping..."
  for ((i=${#pids[@]}-1; i>=0; i--)); do
    pid=${pids[i]}
    # `prefect server start` runs its server in a session of its own: not in $pid's group, so name it too
    kids=$(descendants "$pid")
    kill -TERM -- "-$pid" $kids 2>/dev/null || true
    for _ in $(seq 1 40); do alive "$pid" $kids || break; sleep 0.5; done
    kill -KILL -- "-$pid" $kids 2>/dev/null || true
  done
  wait 2>/dev/null || true
  echo "stopped"
}
trap stop EXIT
trap "stop; exit 130" INT TERM

port_free() { ! (exec 3<>"/dev/tcp/$CHECK_HOST/$1") 2>/dev/null; }
for port in "$PREFECT_PORT" "$MLFLOW_PORT"; do
  port_free "$port" || { echo "error: port $port on $CHECK_HOST is in use (set PREFECT_PORT / MLFLOW_PORT)" >&2; exit 2; }
done

wait_for() {  # url name pid
  for _ in $(seq 1 240); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { echo "error: the $2 server exited; see $LOGS/ui-$2.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "error: the $2 server did not answer at $1 within 120 s; see $LOGS/ui-$2.log" >&2; exit 1
}

env -u PREFECT_API_URL PREFECT_SERVER_API_HOST="$UI_HOST" PREFECT_SERVER_API_PORT="$PREFECT_PORT" \
  PREFECT_UI_API_URL="http://$UI_PUBLIC_HOST:$PREFECT_PORT/api" setsid "$PY" -m prefect server start --host "$UI_HOST" --port "$PREFECT_PORT" >"$LOGS/ui-prefect.log" 2>&1 &
pids+=($!); prefect_pid=$!
mlflow_hosts=()  # MLflow 3 rejects requests whose Host header it does not know
[[ "$UI_HOST" == "0.0.0.0" ]] && mlflow_hosts=(--allowed-hosts "$UI_PUBLIC_HOST:$MLFLOW_PORT,localhost:$MLFLOW_PORT,127.0.0.1:$MLFLOW_PORT")
# No MLflow job runner (GenAI jobs we do not use): its huey consumers start their own sessions and outlived Ctrl-C.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$PY" -m mlflow server --host "$UI_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" "${mlflow_hosts[@]}" \
  --backend-store-uri "$MLFLOW_BACKEND" --artifacts-destination "$MLFLOW_ARTIFACTS" \
  >"$LOGS/ui-mlflow.log" 2>&1 &
pids+=($!); mlflow_pid=$!
wait_for "http://$CHECK_HOST:$PREFECT_PORT/api/health" prefect "$prefect_pid"
wait_for "http://$CHECK_HOST:$MLFLOW_PORT/health" mlflow "$mlflow_pid"

export PREFECT_API_URL="http://$UI_PUBLIC_HOST:$PREFECT_PORT/api"
export MLFLOW_TRACKING_URI="http://$UI_PUBLIC_HOST:$MLFLOW_PORT"
if [[ "$SERVE" != 0 ]]; then
  setsid "$PY" -m flows serve &
  pids+=($!)
fi
cat <<MSG
Prefect UI   http://$UI_PUBLIC_HOST:$PREFECT_PORT   (Deployments -> pipeline/all -> Run -> Custom run)
MLflow UI    http://$UI_PUBLIC_HOST:$MLFLOW_PORT   (experiment diffusion-distill; Models for the registry)
Use the same servers from another shell:
  export PREFECT_API_URL=$PREFECT_API_URL MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
Ctrl-C stops everything.
MSG
wait -n "${pids[@]}" || true
echo "a server exited (logs in $LOGS/ui-*.log)" >&2
