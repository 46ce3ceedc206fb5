"""One run directory, one owner: the run lock, alone and around the real pipeline; versions of resumed stages."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from storage.run_lock import RunLocked, run_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from storage.run_lock import run_lock\nwith run_lock(sys.argv[1], 'holder-test'):\n    print('held', flush=True); time.sleep(60)"


def _holder(root: Path) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_owner_fails_at_once_naming_the_holder_and_a_dead_holder_frees_it(tmp_path):
    p = _holder(tmp_path)
    try:
        t = time.perf_counter()
        with pytest.raises(RunLocked) as e:
            with run_lock(tmp_path, "me"):
                pass
        assert time.perf_counter() - t < 1.0
        msg = str(e.value)
        assert "\n" not in msg and "already running" in msg and "holder-test" in msg
        assert f"pid {p.pid}" in msg and socket.gethostname() in msg
    finally:
        p.kill()  # SIGKILL: the kernel drops the flock with the process
        p.wait()
    with run_lock(tmp_path, "me"):
        with run_lock(tmp_path, "me again"):  # re-entrant in one process (subflows)
            assert "me" in (tmp_path / "run.lock").read_text()
    assert (tmp_path / "run.lock").read_text() == ""  # released: no stale holder


def test_a_stage_flow_refuses_a_run_dir_its_parent_does_not_own(prefect_server, tmp_path):
    from flows.config import load_config
    from flows.select import select_top_k

    cfg = load_config("demo", {"run_id": "locked", "runs_dir": str(tmp_path)})
    p = _holder(tmp_path / "locked")
    try:
        state = select_top_k(cfg.model_dump(mode="json"), return_state=True)
    finally:
        p.kill()
        p.wait()
    assert state.is_failed() and "already running" in state.message, state.message
    assert not (tmp_path / "locked" / "manifests").exists()  # refused before touching the run


def test_two_runs_of_one_directory_the_second_fails_in_one_line(prefect_server, tmp_path):
    """Today's failure: two processes on one run dir trained every arch twice. Now the
    second exits non-zero at once with one line; the first, held inside its search
    stage meanwhile, finishes unharmed with every arch trained once."""
    from helpers import pipeline_process, tiny_args
    from prefect.settings import PREFECT_API_URL

    args = tiny_args("twice", tmp_path, **{"search.total_archs": 4, "execution.report": False})
    gate, log = tmp_path / "go", tmp_path / "first.log"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    first = pipeline_process(args, {**env, "NASFCOS_FAULT": f"stage:search=wait:{gate}"}, log)
    try:
        deadline = time.time() + 300
        while not Path(f"{gate}.reached").exists():
            assert first.is_alive() and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "flows.nas_search", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "already running" in lines[0] and f"pid {first.pid}" in lines[0], second.stderr[-2000:]
        gate.touch()
        first.join(timeout=300)
    finally:
        gate.touch()
        if first.is_alive():
            first.kill()
    assert first.exitcode == 0, log.read_text()[-2000:]
    ids = [line.split()[1] for line in (tmp_path / "twice" / "evaluations.log").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 4
    assert len(pd.read_parquet(tmp_path / "twice" / "results.parquet")) == 4


def test_sigterm_stops_the_run_its_temporary_server_and_frees_the_run(tmp_path):
    """Fault 6 of issue #26: SIGTERM (preemption by SLURM or Kubernetes, ``kill``) of
    ``python -m flows.nas_search`` left its temporary Prefect server running as an orphan
    for good. Now the flow ends crashed, the server stops, the run lock is free, one line."""
    gate = tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), NASFCOS_FAULT=f"stage:finetune-backbone=wait:{gate}")
    args = ["--config", "tiny", "--set", f"runs_dir={tmp_path}", "--set", "run_id=term"]
    p = subprocess.Popen([sys.executable, "-m", "flows.nas_search", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not Path(f"{gate}.reached").exists():
            assert p.poll() is None and time.time() < deadline, p.stderr.read()[-2000:] if p.poll() is not None else "no flow after 240 s"
            time.sleep(0.2)
        children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(p.pid)], capture_output=True, text=True).stdout.splitlines()
        servers = [int(c.split()[0]) for c in children if "uvicorn" in c]
        assert len(servers) == 1, children  # the temporary Prefect server
        p.terminate()
        _, err = p.communicate(timeout=120)
    finally:
        gate.touch()
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and "\nnas-search stopped (signal SIGTERM); run it again to resume\n" in err, err[-2000:]
    deadline = time.time() + 30
    while os.path.exists(f"/proc/{servers[0]}") and time.time() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{servers[0]}"), "the temporary Prefect server outlived its flow"
    with run_lock(tmp_path / "term"):  # free again
        pass


def test_a_temporary_server_gets_two_minutes_to_start():
    """Fault 6 of issue #26: on a busy machine the temporary server's start passed Prefect's
    20 s and the run failed ("Timed out while attempting to connect to ephemeral Prefect API
    server"). The flows package sets 120 s unless the user set another."""
    code = "import flows; from prefect.settings import get_current_settings as s; print(s().server.ephemeral.startup_timeout_seconds)"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["120"], out.stderr[-2000:]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**env, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["300"], out.stderr[-2000:]


def test_a_bad_config_is_one_line_and_non_zero(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "flows.nas_search", "--config", "demo", "--set", "search.total_archs=-3", "--set", f"runs_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "total_archs" in lines[0], p.stderr[-2000:]


def _select_run(tmp_path):
    """A run dir holding 3 ok results and the config of its select-top-k stage."""
    from datetime import datetime, timezone

    import numpy as np

    from flows.config import load_config
    from nasfcos.arch import Arch
    from storage.results import ResultsTable

    now = datetime.now(timezone.utc)
    rows = []
    for i in range(3):
        a = Arch.random(np.random.default_rng(i))
        rows.append({
            "arch_id": a.arch_id, "arch": str(a), "status": "ok", "reward": -1.0 - i, "loss_cls": 0.5, "loss_reg": 0.3,
            "loss_ctr": 0.2, "params": 1, "macs": 1, "train_seconds": 0.0, "eval_seconds": 0.0, "peak_mem_mb": 0.0,
            "device": "cpu", "seed": 0, "error": "", "started_at": now, "finished_at": now, "step": 0, "sample": i,
            "reward_used": -1.0 - i, **a.columns(),
        })  # fmt: skip
    ResultsTable(tmp_path / "v").append(rows)
    return load_config("demo", {"run_id": "v", "runs_dir": str(tmp_path), "select.top_k": 2})


def test_a_stage_begun_under_other_versions_is_refused_unless_allowed(prefect_server, tmp_path):
    import json

    from flows.select import select_top_k

    cfg = _select_run(tmp_path)
    claim = tmp_path / "v" / "manifests" / "select-top-k.claim.json"
    import atomicio
    from flows.stages import conflict_fields
    from storage.run_dir import config_hash, versions

    fields = conflict_fields(cfg, "select-top-k")
    atomicio.write_json(claim, {"stage": "select-top-k", "key": config_hash(fields), "fields": fields, "versions": {**versions(), "torch": "2.11.0"}})
    state = select_top_k(cfg.model_dump(mode="json"), return_state=True)
    assert state.is_failed() and f"torch 2.11.0 -> {versions()['torch']}" in state.message and "allow_version_change" in state.message
    allowed = cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"allow_version_change": True})})
    assert select_top_k(allowed.model_dump(mode="json"), return_state=True).is_completed()
    # a finished stage made by other versions: a warning naming it, no refusal
    manifest = tmp_path / "v" / "manifests" / "select-top-k.json"
    m = json.loads(manifest.read_text())
    m["versions"]["torchvision"] = "0.26.0"
    manifest.write_text(json.dumps(m))
    import logging

    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: seen.append(r.getMessage())
    logging.getLogger("prefect.flow_runs").addHandler(handler)  # Prefect's run loggers do not propagate
    try:
        assert select_top_k(cfg.model_dump(mode="json"), return_state=True).is_completed()
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(handler)
    assert any("select-top-k.json: torchvision 0.26.0" in m for m in seen), seen


def test_the_failed_run_automation_is_accepted_by_the_server(prefect_server, tmp_path):
    """deployments/automations.yaml (docs/operations.md "Failure and recovery"): valid for Prefect's API,
    with a real notification block's id in place of the placeholder."""
    import uuid

    import yaml
    from prefect import get_client
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.schemas.automations import AutomationCore

    block_id = CustomWebhookNotificationBlock(name="test", url="http://127.0.0.1:9/hook").save(f"nasfcos-{uuid.uuid4().hex[:8]}")
    failed, lost = yaml.safe_load((ROOT / "deployments" / "automations.yaml").read_text())["automations"]
    failed["actions"][0]["block_document_id"] = str(block_id)
    with get_client(sync_client=True) as client:
        got = client.read_automation(client.create_automation(AutomationCore.model_validate(failed)))
        job = client.read_automation(client.create_automation(AutomationCore.model_validate(lost)))
    assert got.name == "nasfcos run failed" and got.enabled
    assert set(got.trigger.expect) == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    # a train-arch job without a heartbeat for 3 min is marked Crashed (train-full resubmits it)
    assert job.trigger.posture == "Proactive" and job.trigger.within.total_seconds() == 180 and job.actions[0].state == "CRASHED"
