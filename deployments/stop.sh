#!/usr/bin/env bash
# `make stop`: end the worker and server that `make demo` started (pids in .prefect/).
cd "$(dirname "$0")/.."
for name in worker server; do
  pidfile=.prefect/$name.pid
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -INT "$pid" 2>/dev/null  # what Ctrl-C would send: a clean shutdown
    for _ in $(seq 1 15); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    echo "stopped $name ($pid)"
  fi
  rm -f "$pidfile"
done
[ -d .prefect/postgres ] && deployments/postgres.sh stop
exit 0
