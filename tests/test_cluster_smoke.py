"""deployments/cluster-smoke.sh: a small pipeline through a real dask scheduler + 2 workers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("prefect_dask")
ROOT = Path(__file__).resolve().parents[1]


def test_cluster_smoke_script_exits_0(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "SMOKE_DIR": str(tmp_path), "NASFCOS_BIN": str(Path(sys.executable).parent)}
    p = subprocess.run(["bash", str(ROOT / "deployments" / "cluster-smoke.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "cluster-smoke ok: 6 archs evaluated once each by 2 dask workers" in p.stdout
    assert not (tmp_path / "prefect").exists()  # it used the running server, not one of its own
