#!/usr/bin/env bash
# `make demo`: a local Prefect server (state in .prefect/), a process work pool, the
# deployments of deployments/prefect.yaml, a worker, then `nas-search/demo` run and watched.
# The server and worker keep running for you to look at the UI; `make stop` ends them.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export NASFCOS_ROOT="$PWD"
export PREFECT_HOME="$PWD/.prefect"
export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT:-4200}/api"
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_LOGGING_EXTRA_LOGGERS=nasfcos,storage
mkdir -p .prefect
set -m  # background jobs get their own process group and keep SIGINT, so `make stop` can end them cleanly

api() { "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + sys.argv[2], timeout=2)" "$PREFECT_API_URL" "$1" 2>/dev/null; }  # GET answers 2xx
healthy() { api /health; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ "${DB:-sqlite}" = postgres ]; then  # `make demo DB=postgres`: the server's database in a local PostgreSQL
  if healthy; then
    echo "a Prefect server is already running on ${PREFECT_API_URL%/api} with its own database; 'make stop' first to switch to PostgreSQL" >&2
  else
    PREFECT_API_DATABASE_CONNECTION_URL=$(deployments/postgres.sh start)
    export PREFECT_API_DATABASE_CONNECTION_URL
    echo "PostgreSQL: $PREFECT_API_DATABASE_CONNECTION_URL (data in .prefect/postgres)"
  fi
fi
# The Makefile installs without byte-compiling; compile the venv at the lowest priority on the
# core that the server's start (one thread) leaves idle, so later first imports find .pyc files.
nice -n 19 "$BIN/python" -m compileall -q -j 0 "$(ls -d "${BIN%/bin}"/lib/python3*/site-packages)" > /dev/null 2>&1 &
if ! healthy; then
  echo "starting the Prefect server on ${PREFECT_API_URL%/api} (log: .prefect/server.log)"
  nohup "$BIN/prefect" server start --host 127.0.0.1 --port "${PREFECT_PORT:-4200}" > .prefect/server.log 2>&1 &
  echo $! > .prefect/server.pid
  for _ in $(seq 1 180); do healthy && break; sleep 1; done
  healthy || { echo "the Prefect server did not start; see .prefect/server.log" >&2; exit 1; }
fi
if ! running .prefect/worker.pid; then
  echo "starting a worker on pool 'local' (log: .prefect/worker.log)"
  # --type process: the worker creates the pool when it is missing (one CLI start less);
  # it polls every 2 s instead of 10, so the demo's run starts as soon as it is scheduled
  PREFECT_WORKER_QUERY_SECONDS=2 nohup "$BIN/prefect" worker start --pool local --type process > .prefect/worker.log 2>&1 &
  echo $! > .prefect/worker.pid
fi
for _ in $(seq 1 120); do api /work_pools/local && break; sleep 0.5; done
api /work_pools/local || { echo "work pool 'local' does not exist and the worker did not create it; see .prefect/worker.log" >&2; exit 1; }
"$BIN/prefect" --no-prompt deploy --all --prefect-file deployments/prefect.yaml > .prefect/deploy.log 2>&1 \
  || { cat .prefect/deploy.log >&2; exit 1; }
# ~20 min on 2 idle cores, ~35 on 2 busy ones (RESULTS.md): watched up to 3 h, not 30 min
"$BIN/prefect" deployment run nas-search/demo --watch --watch-timeout 10800
RUN="$PWD/runs/demo"
echo
echo "run directory: $RUN"
echo "Prefect UI:    ${PREFECT_API_URL%/api}"
"$BIN/python" - "$RUN" <<'PY'
import sys
import pandas as pd
run = sys.argv[1]
pd.set_option("display.width", 160)
df = pd.read_parquet(f"{run}/results.parquet")
print(f"\nresults.parquet: {len(df)} architectures; top 5 by proxy reward:")
print(df.sort_values("reward", ascending=False)[["arch_id", "reward", "loss_cls", "loss_reg", "loss_ctr", "params", "status"]].head().to_string(index=False))
print("\nleaderboard.parquet (full training with one budget, COCO-style AP on the synthetic val split):")
print(pd.read_parquet(f"{run}/leaderboard.parquet")[["arch_id", "kind", "AP", "AP50", "proxy_reward", "params"]].to_string(index=False))
PY
echo
"$BIN/python" -m flows.report "$RUN" | sed 's/^/report: /' 
echo
echo "The server and worker keep running; 'make stop' ends them."
