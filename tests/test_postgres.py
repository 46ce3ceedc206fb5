"""Prefect on PostgreSQL: deployments/postgres.sh's cluster behind a real Prefect server,
a stage flow run against it, its state read back from the API and from the database."""

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = shutil.which("pg_ctl") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))), None)
pytestmark = pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL's pg_ctl is not on PATH or under /usr/lib/postgresql/*/bin")

FLOW = """
import sys
from flows.config import load_config
from flows.select import select_top_k
from nasfcos.arch import Arch
from storage.results import ResultsTable
import numpy as np
from datetime import datetime, timezone

runs = sys.argv[1]
now = datetime.now(timezone.utc)
rows = []
for i in range(3):
    a = Arch.random(np.random.default_rng(i))
    rows.append({"arch_id": a.arch_id, "arch": str(a), "status": "ok", "reward": -1.0 - i, "loss_cls": 0.5, "loss_reg": 0.3,
                 "loss_ctr": 0.2, "params": 1, "macs": 1, "train_seconds": 0.0, "eval_seconds": 0.0, "peak_mem_mb": 0.0,
                 "device": "cpu", "seed": 0, "error": "", "started_at": now, "finished_at": now, "step": 0, "sample": i, "reward_used": -1.0 - i, **a.columns()})
ResultsTable(f"{runs}/pg").append(rows)
cfg = load_config("demo", {"run_id": "pg", "runs_dir": runs, "select.top_k": 2})
print(select_top_k(cfg.model_dump(mode="json"))["arch_ids"])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/health", timeout=2)
        return True
    except OSError:
        return False


def test_a_flow_runs_on_a_prefect_server_backed_by_postgres(tmp_path):
    pg_dir = Path(tempfile.mkdtemp(prefix="nasfcos-pg-", dir="/tmp"))  # readable by the cluster's user when root
    pg_dir.chmod(0o755)
    env = {**os.environ, "PG_DIR": str(pg_dir / "pg"), "PG_PORT": str(_free_port()), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = None
    try:
        start = subprocess.run(["bash", str(ROOT / "deployments/postgres.sh"), "start"], env=env, capture_output=True, text=True, timeout=120)
        assert start.returncode == 0, start.stderr
        db_url = start.stdout.strip().splitlines()[-1]
        assert db_url.startswith("postgresql+asyncpg://")
        api = f"http://127.0.0.1:{_free_port()}/api"
        env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_DATABASE_CONNECTION_URL=db_url)
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", api.split(":")[-1].split("/")[0]],
            env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.time() + 180
        while not _healthy(api):
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        flow_env = {**env, "PREFECT_API_URL": api}
        flow_env.pop("PREFECT_API_DATABASE_CONNECTION_URL")
        run = subprocess.run([sys.executable, "-c", FLOW, str(tmp_path / "runs")], cwd=ROOT, env=flow_env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        # the flow run is in PostgreSQL: read it back through the API and with psql
        check = subprocess.run(
            [sys.executable, "-c", "from prefect import get_client\nwith get_client(sync_client=True) as c:\n"
             "    print(*sorted(f'{r.name}|{r.state_type.value}' for r in c.read_flow_runs()), sep='\\n')"],
            env=flow_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert "pg · select-top-k|COMPLETED" in check.stdout, check.stdout + check.stderr[-2000:]
        psql = Path(os.path.realpath(PG_BIN)).parent / "psql"
        rows = subprocess.run(
            [str(psql), "-h", "127.0.0.1", "-p", env["PG_PORT"], "-U", "prefect", "-d", "prefect", "-tAc", "SELECT count(*) FROM flow_run WHERE name = 'pg · select-top-k'"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert rows.stdout.strip() == "1", rows.stdout + rows.stderr
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        stop = subprocess.run(["bash", str(ROOT / "deployments/postgres.sh"), "stop"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(pg_dir, ignore_errors=True)
    assert "stopped postgres" in stop.stdout, stop.stderr
