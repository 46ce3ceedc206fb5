#!/usr/bin/env bash
# The several-machines recipe of deployments/README.md, on one machine: a real `dask scheduler`
# and 2 `dask worker` processes on 127.0.0.1, each in its own working directory (as on separate
# machines, they share only the run directory), then a small nas-search pipeline through them
# (execution.dask_address). Exits 0 when every arch has one row and both workers evaluated some.
#
#   deployments/cluster-smoke.sh            # uses $PREFECT_API_URL if a server answers there,
#                                           # else starts one on 127.0.0.1 for the run
# Everything it starts is stopped on exit; its files stay in the printed directory.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${NASFCOS_BIN:-$ROOT/.venv/bin}
WORK=${SMOKE_DIR:-$(mktemp -d -t nasfcos-cluster-smoke.XXXXXX)}
mkdir -p "$WORK"
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
PIDS=()
cleanup() {  # SIGTERM, up to 5 s to close, then SIGKILL
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    alive=0; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
free_port() { "$BIN/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
healthy() { [ -n "${PREFECT_API_URL:-}" ] && "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$PREFECT_API_URL" 2>/dev/null; }

if ! healthy; then
  port=$(free_port)
  export PREFECT_HOME="$WORK/prefect" PREFECT_API_URL="http://127.0.0.1:$port/api"
  echo "starting a Prefect server on 127.0.0.1:$port (log: $WORK/prefect-server.log)"
  "$BIN/prefect" server start --host 127.0.0.1 --port "$port" > "$WORK/prefect-server.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 120); do healthy && break; sleep 1; done
  healthy || { echo "cluster-smoke: the Prefect server did not start; see $WORK/prefect-server.log" >&2; exit 1; }
fi

port=$(free_port)
ADDRESS="tcp://127.0.0.1:$port"
echo "starting dask scheduler $ADDRESS and 2 workers (logs: $WORK/*.log)"
"$BIN/dask" scheduler --host 127.0.0.1 --port "$port" --dashboard-address 127.0.0.1:0 > "$WORK/scheduler.log" 2>&1 &
PIDS+=($!)
for i in 1 2; do
  mkdir -p "$WORK/worker$i"
  # its own cwd and scratch space: a worker finds the run directory only by its absolute path
  (cd "$WORK/worker$i" && exec "$BIN/dask" worker "$ADDRESS" --host 127.0.0.1 --nthreads 1 --nworkers 1 \
    --name "worker$i" --local-directory "$WORK/worker$i" --resources GPU=1 > "$WORK/worker$i.log" 2>&1) &
  PIDS+=($!)
done
"$BIN/python" - "$ADDRESS" <<'PY'
import sys
from distributed import Client
with Client(sys.argv[1], timeout=60) as c:
    c.wait_for_workers(2, timeout=120)
    print("workers:", ", ".join(sorted(w["name"] for w in c.scheduler_info()["workers"].values())))
PY

# the tiny preset (the demo shrunk to seconds per stage); the search: 6 archs, 2 per
# controller step, async (as many in flight as the cluster's workers have slots: 2); no
# plots (the cluster is what is checked; `python -m flows.report` draws them any time)
cd "$ROOT"
"$BIN/python" -m flows.nas_search --config tiny \
  --set run_id=smoke --set "runs_dir=$WORK/runs" --set execution.report=false \
  --set execution.task_runner=dask --set "execution.dask_address=$ADDRESS" \
  --set search.total_archs=6 --set search.mode=async > "$WORK/flow.log" 2>&1 || { tail -n 30 "$WORK/flow.log" >&2; echo "cluster-smoke: the flow failed; see $WORK/flow.log" >&2; exit 1; }

"$BIN/python" - "$WORK/runs/smoke" "$WORK/flow.log" <<'PY'
import sys
from pathlib import Path
import pandas as pd
run = Path(sys.argv[1])
df = pd.read_parquet(run / "results.parquet")
audit = [line.split() for line in (run / "evaluations.log").read_text().splitlines()]
pids = {a[-1] for a in audit}
assert len(df) == df.arch_id.nunique() == 6 and (df.status == "ok").all(), f"results.parquet: {len(df)} rows, {df.status.tolist()}"
assert sorted(a[1] for a in audit) == sorted(df.arch_id), "evaluations.log: not one evaluation per arch"
assert len(pids) == 2, f"evaluations.log: evaluations ran in {sorted(pids)}, not in both workers"
assert (run / "leaderboard.parquet").exists()
assert "2 workers, 2 evaluation slots" in open(sys.argv[2]).read(), "flow.log: the search did not count the cluster's 2 slots"
print(f"cluster-smoke ok: {len(df)} archs evaluated once each by 2 dask workers ({', '.join(sorted(pids))}); run {run}")
PY
