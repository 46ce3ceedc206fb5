#!/usr/bin/env bash
# A local PostgreSQL cluster for the Prefect server (`make demo DB=postgres`), in $PG_DIR
# (default .prefect/postgres): `start` makes it on first use (initdb) and starts it,
# printing the connection URL for PREFECT_API_DATABASE_CONNECTION_URL; `stop` ends it;
# `url` prints the URL. initdb/pg_ctl come from PATH or /usr/lib/postgresql/<version>/bin
# (Debian/Ubuntu: apt install postgresql; macOS: brew install postgresql@15).
# PostgreSQL refuses to run as root: as root the cluster runs as $PG_USER (default nobody).
set -euo pipefail
cd "$(dirname "$0")/.."
PG_DIR=$(realpath -m "${PG_DIR:-.prefect/postgres}")
PG_PORT=${PG_PORT:-5433}
PG_USER=${PG_USER:-nobody}

bindir() {
  if command -v pg_ctl > /dev/null; then dirname "$(realpath "$(command -v pg_ctl)")"; return; fi
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$d" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return; }
  echo "postgres.sh: pg_ctl not found on PATH or under /usr/lib/postgresql/*/bin; install PostgreSQL (apt install postgresql)" >&2
  exit 2
}
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi; }
url() { echo "postgresql+asyncpg://prefect@127.0.0.1:$PG_PORT/prefect"; }

case "${1:-}" in
  start)
    BIN=$(bindir)
    mkdir -p "$PG_DIR"
    [ "$(id -u)" = 0 ] && chown "$PG_USER" "$PG_DIR"
    if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
      as_owner "$BIN/initdb" -D "$PG_DIR/data" -U prefect --auth=trust --encoding=UTF8 > "$PG_DIR/initdb.log" 2>&1 \
        || { cat "$PG_DIR/initdb.log" >&2; exit 1; }
    fi
    if ! as_owner "$BIN/pg_ctl" -D "$PG_DIR/data" status > /dev/null 2>&1; then
      as_owner "$BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $PG_PORT -k $PG_DIR" start > /dev/null \
        || { tail -20 "$PG_DIR/server.log" >&2; exit 1; }
      "$BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U prefect -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='prefect'" | grep -q 1 \
        || "$BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U prefect prefect
    fi
    url
    ;;
  stop)
    BIN=$(bindir)
    if [ -f "$PG_DIR/data/PG_VERSION" ] && as_owner "$BIN/pg_ctl" -D "$PG_DIR/data" status > /dev/null 2>&1; then
      as_owner "$BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop > /dev/null && echo "stopped postgres ($PG_DIR)"
    fi
    ;;
  url) url ;;
  *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
