"""`make soak N=20`: the real deployment run (Prefect server + process worker) killed at
random points, re-run until it completes, N times; prints a summary table.

Each round starts `nas-search/demo` with the `tiny` preset (a fresh run_id), then up to
--kills times: waits a random time, SIGKILLs the flow-run process (its pid is in the run's
`run.lock`) and starts the deployment again on the same run directory. The round passes
when a run completes with one results row per arch, no arch evaluated twice
(`evaluations.log`), a leaderboard, and no orphaned temp files. Uses its own server
(`--port`, state in a temporary PREFECT_HOME) and run directories under `--dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(api: str) -> bool:
    try:
        urllib.request.urlopen(api + "/health", timeout=2)
        return True
    except OSError:
        return False


def _start(env: dict, home: Path, api: str) -> list[subprocess.Popen]:
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", api.rsplit(":", 1)[1].split("/")[0]],
                              env=env, stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 180
    while not _healthy(api):
        if server.poll() is not None or time.time() > deadline:
            sys.exit(f"soak: the Prefect server did not start; see {home / 'server.log'}")
        time.sleep(1)
    for cmd in (["work-pool", "create", "local", "--type", "process"], ["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"]):
        p = subprocess.run([str(BIN / "prefect"), *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"soak: prefect {' '.join(cmd)} failed: {p.stderr.strip().splitlines()[-1:]}")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "local"], cwd=ROOT, env=env,
                              stdout=open(home / "worker.log", "w"), stderr=subprocess.STDOUT)  # fmt: skip
    return [server, worker]


def _trigger(env: dict, overrides: dict) -> str:
    code = ("import json, sys\nfrom prefect.deployments import run_deployment\n"
            "r = run_deployment('nas-search/demo', parameters={'config': 'tiny', 'overrides': json.loads(sys.argv[1])}, timeout=0)\n"
            "print(r.id)")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code, json.dumps(overrides)], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return p.stdout.strip().splitlines()[-1]


def _state(env: dict, flow_run_id: str, *, message: bool = False) -> str:
    code = ("import sys\nfrom prefect import get_client\nwith get_client(sync_client=True) as c:\n"
            "    s = c.read_flow_run(sys.argv[1]).state\n    print(s.type.value, (s.message or '').replace(chr(10), ' '), sep='\\t')")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code, flow_run_id], env=env, capture_output=True, text=True)
    state, _, text = (p.stdout.strip() or "UNKNOWN").partition("\t")
    return f"{state}: {text}" if message else state


def _second_run_refused(env: dict, overrides: dict, run: Path) -> str:
    """While a run owns ``run``, a second deployment run of it must fail at once with the
    lock's one-line error (docs/operations.md "One run directory, one owner")."""
    while _holder_pid(run) is None:
        time.sleep(0.5)
    second = _trigger(env, overrides)
    t0 = time.time()
    while (state := _state(env, second)) not in FINAL:
        time.sleep(0.5)
    text = _state(env, second, message=True)
    ok = state == "FAILED" and "already running" in text and _holder_pid(run) is not None
    return f"second run refused in {time.time() - t0:.0f} s" if ok else f"second run NOT refused: {text}"


def _holder_pid(run: Path) -> int | None:
    """The pid of the live flow process owning ``run``: the lock file's text outlives a
    killed holder, so the pid must still exist. (Not by taking the lock: that would make
    a flow starting at that instant fail as "already running".)"""
    try:
        pid = int(json.loads((run / "run.lock").read_text())["pid"])
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, KeyError, ProcessLookupError):
        return None


def _stage_at(run: Path) -> str:
    from storage.run_dir import STAGES

    done = [s for s in STAGES if (run / "manifests" / f"{s}.json").exists()]
    return STAGES[len(done)] if len(done) < len(STAGES) else "done"


def _check(run: Path) -> list[str]:
    import pandas as pd

    problems = []
    df = pd.read_parquet(run / "results.parquet")
    ids = [line.split()[1] for line in (run / "evaluations.log").read_text().splitlines()]
    if len(ids) != len(set(ids)):
        problems.append(f"{len(ids) - len(set(ids))} archs evaluated twice")
    if sorted(set(ids)) != sorted(df.arch_id) or df.arch_id.duplicated().any():
        problems.append("results.parquet rows != evaluated archs")
    if not (run / "leaderboard.parquet").exists():
        problems.append("no leaderboard")
    orphans = [p.name for p in run.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]
    if orphans:
        problems.append(f"orphaned temp files {orphans[:3]}")
    return problems


def soak_round(i: int, env: dict, runs: Path, kills: int, rng: random.Random, max_wait: float) -> dict:
    run_id = f"soak-{i}"
    overrides = {"run_id": run_id, "runs_dir": str(runs), "search.total_archs": 6}
    run, killed, attempts, t0 = runs / run_id, [], 0, time.time()
    while True:
        attempts += 1
        fr = _trigger(env, overrides)
        if i == 0 and attempts == 1:
            double = _second_run_refused(env, overrides, run)
            print(f"round 0: {double}", flush=True)
            if "NOT" in double:
                return {"round": i, "kills": "-", "runs": attempts, "seconds": round(time.time() - t0), "result": double}
        kill_at = rng.uniform(2.0, max_wait) if len(killed) < kills else None
        started = None
        while True:
            state = _state(env, fr)
            if state in FINAL:
                break
            pid = _holder_pid(run)
            if pid and started is None:
                started = time.time()
            if kill_at is not None and started is not None and time.time() - started >= kill_at and pid:
                stage = _stage_at(run)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended meanwhile
                    continue
                killed.append(f"{stage}@{kill_at:.0f}s")
                while _state(env, fr) not in FINAL:
                    time.sleep(1)  # the worker reports the crash
                state = "KILLED"
                break
            time.sleep(0.5)
        if state == "COMPLETED":
            problems = _check(run)
            return {"round": i, "kills": ", ".join(killed) or "-", "runs": attempts, "seconds": round(time.time() - t0), "result": "ok" if not problems else "; ".join(problems)}
        if state != "KILLED" or attempts > kills + 3:
            return {"round": i, "kills": ", ".join(killed) or "-", "runs": attempts, "seconds": round(time.time() - t0), "result": f"run ended {state}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="rounds (default %(default)s)")
    ap.add_argument("--kills", type=int, default=2, help="kills per round before it may finish (default %(default)s)")
    ap.add_argument("--max-wait", type=float, default=40.0, help="kill within this many seconds of a run's start")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="run directories (default: a temporary directory, removed)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nasfcos-soak-"))
    runs = Path(a.dir) if a.dir else work / "runs"
    home = work / "prefect"
    home.mkdir(parents=True)
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "NASFCOS_ROOT": str(ROOT), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    procs = _start(env, home, api)
    rng = random.Random(a.seed)
    rows = []
    try:
        for i in range(a.n):
            rows.append(soak_round(i, env, runs, a.kills, rng, a.max_wait))
            print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGINT)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nsoak: {a.n} rounds, up to {a.kills} random SIGKILLs of the flow-run process each (seed {a.seed})\n")
    print("| round | killed in (stage@seconds after start) | runs | seconds | result |\n|---:|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['round']} | {r['kills']} | {r['runs']} | {r['seconds']} | {r['result']} |")
    failed = [r for r in rows if r["result"] != "ok"]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} rounds ok")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
