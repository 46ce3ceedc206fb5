"""Search dispatch at scale (issue #27): the real ``search`` flow, simulated evaluations.

Everything but the decoder training is the product's: the Prefect ``search`` flow on a
Prefect server, its dispatch (``flows/dispatch.py``) to the flow's threads or to Dask
workers in separate processes (an external ``dask scheduler`` and up to 8 ``dask worker``
processes, slots as their threads, as on a cluster), each evaluation's row checks, part
file and audit line, the flow's compactions, controller checkpoints and PPO updates
(``benchmarks/search_scaling.yaml``: the paper's controller and space). Only
``nasfcos.engine.proxy.evaluate_arch`` is replaced by a sleep whose length comes from a
per-arch cost model fitted to ``benchmarks/proxy.py``'s CPU table (RESULTS.md, "Proxy task"):

    seconds = 5.0 + 6.23 * deformable convs in the FPN + 11.13 * in the head + 5.15 * cat aggregations

(four archs, four coefficients: an exact fit; ~11x between the cheapest and the dearest
random arch of the space), scaled so that the mean over random archs is ``--mean`` seconds:
15 s is the GPU goal per arch, 4 s loads the orchestration ~4x harder. The features are not
loaded. Each setting evaluates ``--per-slot`` x slots new archs into a results table that
already holds 2,800 rows (a finished paper-size search).

    python benchmarks/search_scaling.py                            # the settings of RESULTS.md
    python benchmarks/search_scaling.py --settings dask:256:4 thread:64:15

Reported per setting: start-up (first submission -> first evaluation start), wall (first
start -> last row durable), archs/s, utilisation = busy slot-seconds / (slots x wall), the
final drain included (and without it), and CPU seconds per arch of each process: the flow
process (all of it; and its loop thread's dispatch and bookkeeping apart from the
controller's sampling and updates), the Prefect server, the Dask scheduler, the workers.
Finished settings are appended to ``--rows`` (JSON lines) and skipped when run again.
Needs prefect, psutil and the ``dask`` extra; starts its own Prefect server and cluster.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = Path(__file__).with_suffix(".yaml")
COST = {"base": 5.0, "deform_fpn": 6.23, "deform_head": 11.13, "cat": 5.15}  # CPU seconds, see the docstring
PREFILLED = 2800
MAX_PROCESSES = 8  # worker processes: 256 torch-importing processes do not fit 24 GB
DEFAULT = ["thread:64:15", "dask:8:15", "dask:32:15", "dask:64:15", "dask:128:15", "dask:256:15", "dask:256:4", "thread:64:4"]


def raw_cost(arch: str) -> float:
    from nasfcos.arch import Arch

    d = Arch.parse(arch).columns()
    return COST["base"] + COST["deform_fpn"] * d["n_deform_fpn"] + COST["deform_head"] * d["n_deform_head"] + COST["cat"] * (d["n_cat_fpn"] + d["n_cat_head"])


def cost_scale(mean: float, head: str, n: int = 4000) -> float:
    """Factor that makes the mean cost of random archs ``mean`` seconds."""
    from nasfcos.arch import Arch

    rng = np.random.default_rng(0)
    return mean / float(np.mean([raw_cost(str(Arch.random(rng, head=head))) for _ in range(n)]))


def simulated_evaluate_arch(arch, train, val, *, num_classes, cfg, device_shared=False, **_) -> dict:
    """``nasfcos.engine.proxy.evaluate_arch``'s record after sleeping the arch's modelled cost."""
    from nasfcos.arch import Arch

    a = Arch.parse(arch) if isinstance(arch, str) else arch
    seconds = raw_cost(str(a)) * float(os.environ["NASFCOS_SIM_SCALE"])
    started = datetime.now(timezone.utc)
    time.sleep(seconds)
    reward = -2.3 + 0.1 * math.sin(int(a.arch_id, 16) % 1000)  # any deterministic value at the paper's scale
    return {
        "arch_id": a.arch_id, "arch": str(a), "reward": reward, "loss_cls": -reward / 2, "loss_reg": -reward / 3, "loss_ctr": -reward / 6,
        "params": 1, "macs": 1, "train_seconds": seconds, "eval_seconds": 0.0, "peak_mem_mb": 0.0, "device": str(train),
        "seed": cfg.seed, "status": "ok", "error": "", "started_at": started, "finished_at": datetime.now(timezone.utc),
    }  # fmt: skip


def install() -> None:
    """Swap the proxy training for the simulation in this process (the flow's and each worker's)."""
    import flows.feature_cache
    import nasfcos.engine.proxy

    nasfcos.engine.proxy.evaluate_arch = simulated_evaluate_arch
    flows.feature_cache.splits = lambda key: (key[1], None, 20)  # no features to load


def dask_setup(worker) -> None:  # noqa: ARG001 - Dask preload hook, runs in each worker process
    install()


CLOCK: dict[str, float] = {}  # thread CPU seconds of the loop thread: "loop" (all of it), "controller"


def instrument() -> None:
    """Time the loop thread (its CPU from the first transition to the summary) and, within
    it, the controller's sampling and updates (patches once per process)."""
    import nasfcos.search.policies
    from nasfcos.search.asynchronous import AsyncSearch

    if getattr(AsyncSearch.run, "timed", False):
        return
    run, build = AsyncSearch.run, nasfcos.search.policies.build_policy

    def timed_run(self):
        t = time.thread_time()
        try:
            return run(self)
        finally:
            CLOCK["loop"] = CLOCK.get("loop", 0.0) + time.thread_time() - t

    timed_run.timed = True
    AsyncSearch.run = timed_run

    class Timed:
        def __init__(self, policy) -> None:
            self.policy = policy

        def __getattr__(self, name):
            return getattr(self.policy, name)

        def sample(self, n):
            t = time.thread_time()
            try:
                return self.policy.sample(n)
            finally:
                CLOCK["controller"] = CLOCK.get("controller", 0.0) + time.thread_time() - t

        def update(self, samples, rewards):
            t = time.thread_time()
            try:
                return self.policy.update(samples, rewards)
            finally:
                CLOCK["controller"] = CLOCK.get("controller", 0.0) + time.thread_time() - t

    nasfcos.search.policies.build_policy = lambda *a, **k: Timed(build(*a, **k))


def prefill(run_dir: Path, head: str) -> set[str]:
    """2,800 rows of distinct random archs, compacted, as a long search leaves them."""
    from nasfcos.arch import Arch
    from nasfcos.search.rows import make_row
    from storage.results import ResultsTable

    rng, rows, seen = np.random.default_rng(1), [], set()
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    while len(rows) < PREFILLED:
        a = Arch.random(rng, head=head)
        if a.arch_id in seen:
            continue
        seen.add(a.arch_id)
        rec = {
            "arch_id": a.arch_id, "arch": str(a), "reward": float(rng.normal(-2.3, 0.1)), "loss_cls": 1.0, "loss_reg": 1.0, "loss_ctr": 0.3,
            "params": 1, "macs": 1, "train_seconds": 4.0, "eval_seconds": 0.0, "peak_mem_mb": 0.0, "device": "cuda:0", "seed": 0,
            "status": "ok", "error": "", "started_at": t0, "finished_at": t0,
        }  # fmt: skip
        rows.append(make_row(rec, step=len(rows) // 8, sample=len(rows) % 8, penalty=-10.0))
    table = ResultsTable(run_dir)
    table.append(rows)
    table.compact()
    return seen


class Cluster:
    """An external ``dask scheduler`` and ``processes`` ``dask worker`` processes of
    ``threads`` slots each on 127.0.0.1, every one running this file as its preload."""

    def __init__(self, processes: int, threads: int, work: Path, env: dict) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        self.address = f"tcp://127.0.0.1:{port}"
        bin_ = Path(sys.executable).parent
        logs = work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.scheduler = subprocess.Popen(
            [str(bin_ / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"],
            stdout=open(logs / "scheduler.log", "w"), stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        self.workers = [
            subprocess.Popen(
                [
                    str(bin_ / "dask"),
                    "worker",
                    self.address,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    str(threads),
                    "--no-nanny",
                    "--name",
                    f"w{i}",
                    "--local-directory",
                    str(work / f"w{i}"),
                    "--preload",
                    str(Path(__file__).resolve()),
                ],
                stdout=open(logs / f"w{i}.log", "w"),
                stderr=subprocess.STDOUT,
                env=env,
            )  # fmt: skip
            for i in range(processes)
        ]
        from distributed import Client

        with Client(self.address, timeout=120) as c:
            c.wait_for_workers(processes, timeout=300)

    def cpu(self) -> dict[str, float]:
        import psutil

        def seconds(p) -> float:
            t = psutil.Process(p.pid).cpu_times()
            return t.user + t.system

        return {"scheduler": seconds(self.scheduler), "workers": sum(seconds(w) for w in self.workers)}

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            p.terminate()
        for p in [*self.workers, self.scheduler]:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def process_cpu() -> dict[str, float]:
    """CPU seconds of this process and of its other children (the Prefect test server)."""
    import psutil

    me = psutil.Process()
    own = me.cpu_times()
    server = 0.0
    for child in me.children(recursive=True):
        try:
            if "dask" not in " ".join(child.cmdline()):
                t = child.cpu_times()
                server += t.user + t.system
        except psutil.Error:
            pass
    return {"flow": own.user + own.system, "server": server}


def measure(setting: str, *, per_slot: int, work: Path, env: dict) -> dict:
    """Run one setting (``runner:slots:mean``) through the real search flow; its figures."""
    from flows.config import load_config
    from flows.placement import task_runner
    from flows.search import search
    from flows.stages import portable
    from storage.results import ResultsTable

    runner, slots, mean = setting.split(":")
    slots, mean = int(slots), float(mean)
    name = f"{runner}-{slots}-{mean:g}s"
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg0 = load_config(CONFIG)
    before = prefill(run_dir, cfg0.search.head)
    n = per_slot * slots
    scale = cost_scale(mean, cfg0.search.head)
    os.environ["NASFCOS_SIM_SCALE"] = str(scale)
    overrides = {"run_id": name, "runs_dir": str(work), "search.total_archs": PREFILLED + n, "execution.task_runner": runner}
    cluster = None
    if runner == "dask":
        procs = min(MAX_PROCESSES, slots)
        cluster = Cluster(procs, slots // procs, work / f"{name}-cluster", {**env, "NASFCOS_SIM_SCALE": str(scale)})
        overrides.update({"execution.dask_address": cluster.address, "execution.slots_per_device": slots // procs})
    else:
        procs = 1
        overrides["execution.slots_per_device"] = slots
    cfg = load_config(CONFIG, overrides)
    CLOCK.clear()
    instrument()
    try:
        cpu0, ccpu0, t0 = process_cpu(), cluster.cpu() if cluster else {}, time.time()
        search.with_options(task_runner=task_runner(cfg))(portable(cfg))
        cpu1, ccpu1 = process_cpu(), cluster.cpu() if cluster else {}
    finally:
        if cluster is not None:
            cluster.close()

    df = ResultsTable(run_dir).read()
    new = df[~df.arch_id.isin(before)]
    durable = {}
    for line in (run_dir / "evaluations.log").read_text().splitlines():
        stamp, aid = line.split()[:2]
        durable.setdefault(aid, datetime.fromisoformat(stamp).timestamp())
    start = new.started_at.map(lambda t: t.timestamp()).to_numpy()
    end = new.finished_at.map(lambda t: t.timestamp()).to_numpy()
    dur = np.array([durable[a] for a in new.arch_id])
    first = float(start.min())
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu0} | {k: ccpu1[k] - ccpu0[k] for k in ccpu0}
    row = {
        "setting": setting, "runner": runner, "slots": slots, "mean": mean, "processes": procs, "archs": len(new), "evaluations": len(durable),
        "cpu_s": cpu, "loop_s": CLOCK.get("loop", 0.0), "controller_s": CLOCK.get("controller", 0.0), "submitted_at": t0,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "per_arch": {k: (v - first).round(4).tolist() for k, v in (("start", start), ("end", end), ("durable", dur))},
    }  # fmt: skip
    row["startup_s"] = first - t0
    return {**row, **figures(row)}


def figures(row: dict) -> dict:
    """The timing figures of a setting, from its per-arch times (seconds from the first start)."""
    start, end, dur = (np.asarray(row["per_arch"][k]) for k in ("start", "end", "durable"))
    slots, n = row["slots"], len(start)
    wall = float(dur.max() - start.min())
    return {
        "wall_s": wall, "archs_per_s": n / wall, "utilisation": float((end - start).sum() / (slots * wall)),
        # without the final drain (the last archs finishing one by one), which a search pays once
        "steady_utilisation": float((np.minimum(end, start.max()) - start).sum() / (slots * (start.max() - start.min()))),
        "mean_eval_s": float((end - start).mean()), "end_to_durable_s": float((dur - end).mean()),
        "ms_per_arch": {k: 1000 * v / n for k, v in row["cpu_s"].items()},
        "loop_ms_per_arch": 1000 * (row["loop_s"] - row["controller_s"]) / n, "controller_ms_per_arch": 1000 * row["controller_s"] / n,
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    out = [
        "| runner | slots | mean s | archs | start-up s | wall s | archs/s | utilisation | steady util. | end->durable s "
        "| CPU ms/arch: flow (loop thread: dispatch+bookkeeping, controller) | server | scheduler | workers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        m = r["ms_per_arch"]
        runner = f"dask x{r['processes']}" if r["runner"] == "dask" else "thread"
        out.append(
            f"| {runner} | {r['slots']} | {r['mean']:g} | {r['archs']} | {r['startup_s']:.1f} | {r['wall_s']:.0f} | {r['archs_per_s']:.2f} | "
            f"{r['utilisation']:.3f} | {r['steady_utilisation']:.3f} | {r['end_to_durable_s']:.3f} | "
            f"{m['flow']:.1f} ({r['loop_ms_per_arch']:.2f}, {r['controller_ms_per_arch']:.1f}) | {m['server']:.1f} | "
            f"{m.get('scheduler', float('nan')):.1f} | {m.get('workers', float('nan')):.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=DEFAULT, help="runner:slots:mean_seconds (runner: thread or dask)")
    p.add_argument("--per-slot", type=int, default=20, help="new archs per slot in each setting (>= 20)")
    p.add_argument("--rows", default=str(ROOT / "benchmarks" / "search_scaling.jsonl"))
    a = p.parse_args()

    env = {
        **os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1",
        "DASK_LOGGING__DISTRIBUTED": "warning", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    os.environ.update({k: env[k] for k in ("DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED", "DASK_LOGGING__DISTRIBUTED")})
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    done = [json.loads(line) for line in open(a.rows)] if os.path.exists(a.rows) else []
    have = {r["setting"] for r in done if r.get("per_slot") == a.per_slot}
    todo = [s for s in a.settings if s not in have]
    if todo:
        from prefect.testing.utilities import prefect_test_harness

        install()
        with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
            for setting in todo:
                row = {**measure(setting, per_slot=a.per_slot, work=Path(tmp), env=env), "per_slot": a.per_slot}
                with open(a.rows, "a") as f:
                    f.write(json.dumps(row) + "\n")
                done.append(row)
                print(f"{setting}: utilisation {row['utilisation']:.3f}, {row['archs_per_s']:.2f} archs/s, loop {row['loop_ms_per_arch']:.2f} ms/arch", flush=True)
    order = {s: i for i, s in enumerate(a.settings)}
    print(table(sorted((r for r in done if r["setting"] in order and r.get("per_slot") == a.per_slot), key=lambda r: order[r["setting"]])))


if __name__ == "__main__":
    main()
