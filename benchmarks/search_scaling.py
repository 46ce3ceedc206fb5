"""Search orchestration at scale: the real ``search`` flow with a simulated evaluator (issue #11, item 3).

Everything but the decoder training is the product's: the Prefect ``search`` flow on a
Prefect server, its tasks on the thread runner or a 2-process Dask ``LocalCluster``,
each task's part-file append and audit line, the flow's results appends, compactions,
controller checkpoints and PPO updates (default controller). Only
``nasfcos.engine.proxy.evaluate_arch`` is replaced by a sleep whose length comes from a per-arch
cost model fitted to ``benchmarks/proxy.py``'s CPU table (RESULTS.md, "Proxy task"):

    seconds = 5.0 + 6.23 * deformable convs in the FPN + 11.13 * in the head + 5.15 * cat aggregations

(four archs, four coefficients: an exact fit, enough to give the cost spread of the real
search, ~20x between the cheapest and the dearest), scaled so that the mean over random
archs of the searched space is ``--mean`` seconds (4 s: a quarter of the 15 s GPU goal per
arch, so orchestration is tested 4x harder than it will be). The features are not loaded.

Each setting (slots x mode x runner) evaluates ``--per-slot`` x slots new archs into a
results table that already holds 2,800 rows. Async mode updates the controller every 8
results; sync mode samples max(8, slots) archs per step, so that one step fills every slot.

    python benchmarks/search_scaling.py                         # 1/8/32/64 slots, sync+async, thread+dask
    python benchmarks/search_scaling.py --slots 8 --modes async --runners thread

Reported per setting: the runner's start-up (first submit -> first evaluator start: a
Dask cluster's workers importing torch), wall (first evaluator start -> last row
durable), archs/hour, slot
utilisation (busy slot-seconds / (slots x wall)), orchestration overhead per arch
(submit, or the end of start-up, -> evaluator start; evaluator end -> row durable;
means) and controller seconds per
arch (sampling + updates). Finished settings are appended to ``--rows`` (JSON lines) and
skipped when run again. Needs prefect and the ``dask`` extra; starts its own Prefect server.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COST = {"base": 5.0, "deform_fpn": 6.23, "deform_head": 11.13, "cat": 5.15}  # CPU seconds, see the docstring
PREFILLED = 2800
_SCALE = {"mean": 4.0}  # set by main / by a Dask worker's preload from the environment


def raw_cost(arch: str) -> float:
    from nasfcos.arch import Arch

    d = Arch.parse(arch).columns()
    return COST["base"] + COST["deform_fpn"] * d["n_deform_fpn"] + COST["deform_head"] * d["n_deform_head"] + COST["cat"] * (d["n_cat_fpn"] + d["n_cat_head"])


def cost_scale(mean: float, head: str, n: int = 4000) -> float:
    """Factor that makes the mean cost of random archs ``mean`` seconds."""
    from nasfcos.arch import Arch

    rng = np.random.default_rng(0)
    return mean / float(np.mean([raw_cost(str(Arch.random(rng, head=head))) for _ in range(n)]))


def simulated_evaluate_arch(arch, train, val, *, num_classes, cfg, device=None, **_) -> dict:
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


class TimedPolicy:
    """The flow's policy, timing its sample and update calls."""

    def __init__(self, policy, clock: dict) -> None:
        self.policy, self.clock = policy, clock

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def sample(self, n):
        t = time.perf_counter()
        try:
            return self.policy.sample(n)
        finally:
            self.clock["controller"] += time.perf_counter() - t

    def update(self, samples, rewards):
        t = time.perf_counter()
        try:
            return self.policy.update(samples, rewards)
        finally:
            self.clock["controller"] += time.perf_counter() - t


SUBMITTED: dict[str, float] = {}  # arch id -> when the flow submitted it
CLOCK: dict[str, float] = {}  # seconds the flow thread spent, by kind of work
INSTRUMENTED = False  # instrument() patches once per process


def instrument() -> None:
    """Record into SUBMITTED and CLOCK when the flow submits each arch and how long the
    controller and the flow thread's other work take (patches once per process)."""
    import nasfcos.search.loop
    import nasfcos.search.policies

    global INSTRUMENTED
    if INSTRUMENTED:
        return
    INSTRUMENTED = True
    submitted, clock = SUBMITTED, CLOCK

    build, run_sync, run_async = nasfcos.search.policies.build_policy, nasfcos.search.loop.run_search, nasfcos.search.loop.run_search_async
    nasfcos.search.policies.build_policy = lambda *a, **k: TimedPolicy(build(*a, **k), clock)

    def sync(*, evaluate, **kw):
        def timed(jobs):
            t = time.time()
            for j in jobs:
                submitted.setdefault(j.arch.arch_id, t)
            yield from evaluate(jobs)

        return run_sync(evaluate=timed, **kw)

    def async_(*, submit, **kw):
        def timed(job):
            submitted.setdefault(job.arch.arch_id, time.time())
            t = time.perf_counter()
            try:
                return submit(job)
            finally:
                clock["submit"] = clock.get("submit", 0.0) + time.perf_counter() - t

        return run_async(submit=timed, **kw)

    nasfcos.search.loop.run_search, nasfcos.search.loop.run_search_async = sync, async_
    # the flow thread's other work per arch: its results appends, compactions, checkpoints
    from storage.results import ResultsTable

    for owner, name, key in ((ResultsTable, "append", "append"), (ResultsTable, "compact", "compact"), (nasfcos.search.loop, "save_state", "checkpoint")):
        setattr(owner, name, _timed(getattr(owner, name), clock, key))


def _timed(fn, clock: dict, key: str):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            clock[key] = clock.get(key, 0.0) + time.perf_counter() - t

    wrapper.__wrapped__ = fn
    return wrapper


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


def ready_times(sub: np.ndarray, start: np.ndarray, end: np.ndarray, slots: int) -> np.ndarray:
    """When each evaluation could have started: its submission, or if every slot was busy
    then, when the slot it got was freed. Evaluations take slots in the order they start,
    each the one freed earliest; ``start - ready`` is the orchestration's delay, not the
    wait for a slot (sync mode submits K > slots archs at once)."""
    free = [-np.inf] * slots  # when each slot was last freed (a heap)
    ready = np.empty_like(sub)
    for i in np.argsort(start, kind="stable"):
        ready[i] = min(max(sub[i], heapq.heappop(free)), start[i])
        heapq.heappush(free, end[i])
    return ready


def measure(slots: int, mode: str, runner: str, *, per_slot: int, work: Path, head: str = "seq") -> dict:
    """Run one setting through the real search flow; return its figures."""
    from flows.config import load_config
    from flows.placement import task_runner
    from flows.search import search
    from flows.stages import portable
    from storage.results import ResultsTable

    name = f"{runner}-{mode}-{slots}"
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    before = prefill(run_dir, head)
    n = per_slot * slots
    procs = 2 if runner == "dask" and slots > 1 else 1
    cfg = load_config("demo", {
        "run_id": name, "runs_dir": str(work), "search.head": head, "search.policy": "ppo", "search.mode": mode,
        "search.total_archs": PREFILLED + n, "search.archs_per_step": 8 if mode == "async" else max(8, slots),
        "execution.task_runner": runner, "execution.devices": ["cpu"] * procs, "execution.slots_per_device": slots // procs,
    })  # fmt: skip
    SUBMITTED.clear()
    CLOCK.clear()
    CLOCK["controller"] = 0.0
    instrument()
    search.with_options(task_runner=task_runner(cfg))(portable(cfg))

    df = ResultsTable(run_dir).read()
    new = df[~df.arch_id.isin(before)]
    durable = {}
    for line in (run_dir / "evaluations.log").read_text().splitlines():
        stamp, aid = line.split()[:2]
        durable.setdefault(aid, datetime.fromisoformat(stamp).timestamp())
    start = new.started_at.map(lambda t: t.timestamp()).to_numpy()
    end = new.finished_at.map(lambda t: t.timestamp()).to_numpy()
    sub = np.array([SUBMITTED[a] for a in new.arch_id])
    dur = np.array([durable[a] for a in new.arch_id])
    t0 = float(start.min())
    row = {
        "runner": runner, "mode": mode, "slots": slots, "processes": procs, "archs": len(new),
        "controller_s_per_arch": CLOCK["controller"] / len(new),
        **{f"{k}_s_per_arch": CLOCK.get(k, 0.0) / len(new) for k in ("submit", "append", "compact", "checkpoint")},
        "evaluations": len(durable), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "per_arch": {k: (v - t0).round(4).tolist() for k, v in (("submit", sub), ("start", start), ("end", end), ("durable", dur))},
    }  # fmt: skip
    return {**row, **figures(row)}


def figures(row: dict) -> dict:
    """The timing figures of a setting, from its per-arch times (seconds from the first start).

    The runner's one-time start (a Dask cluster's workers importing torch) is reported
    apart: the steady state starts when the first evaluation does.
    """
    sub, start, end, dur = (np.asarray(row["per_arch"][k]) for k in ("submit", "start", "end", "durable"))
    t0, slots = float(start.min()), row["slots"]
    wall = float(dur.max() - t0)
    queued = start - ready_times(np.maximum(sub, t0), start, end, slots)
    return {
        "startup_s": t0 - float(sub.min()), "wall_s": wall, "archs_per_hour": len(start) / wall * 3600,
        "utilisation": float((end - start).sum() / (slots * wall)), "mean_eval_s": float((end - start).mean()),
        # without the drain at the end (the last archs finishing one by one), which a
        # 2,800-arch search pays once
        "steady_utilisation": float((np.minimum(end, start.max()) - start).sum() / (slots * (start.max() - t0))),
        "submit_to_start_s": float(queued.mean()), "end_to_durable_s": float((dur - end).mean()),
        "overhead_s": float(queued.mean() + (dur - end).mean()),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--modes", nargs="+", default=["async", "sync"], choices=("async", "sync"))
    p.add_argument("--runners", nargs="+", default=["thread", "dask"], choices=("thread", "dask"))
    p.add_argument("--per-slot", type=int, default=20, help="new archs per slot in each setting")
    p.add_argument("--mean", type=float, default=4.0, help="mean simulated seconds per arch")
    p.add_argument("--rows", default=str(ROOT / "benchmarks" / "search_scaling.jsonl"))
    a = p.parse_args()

    os.environ["NASFCOS_SIM_SCALE"] = str(cost_scale(a.mean, "seq"))
    os.environ["DASK_DISTRIBUTED__WORKER__PRELOAD"] = json.dumps([str(Path(__file__).resolve())])  # workers install() too
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"
    done = [json.loads(line) for line in open(a.rows)] if os.path.exists(a.rows) else []
    have = {(r["runner"], r["mode"], r["slots"]) for r in done if r.get("per_slot") == a.per_slot and r.get("mean") == a.mean}
    todo = [(s, m, r) for r in a.runners for s in a.slots for m in a.modes if (r, m, s) not in have]
    if todo:
        from prefect.testing.utilities import prefect_test_harness

        install()
        with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
            for slots, mode, runner in todo:
                row = {**measure(slots, mode, runner, per_slot=a.per_slot, work=Path(tmp)), "per_slot": a.per_slot, "mean": a.mean}
                with open(a.rows, "a") as f:
                    f.write(json.dumps(row) + "\n")
                done.append(row)
                print(f"{runner} {mode} {slots}: util {row['utilisation']:.3f}, overhead {row['overhead_s']:.3f} s, {row['wall_s']:.0f} s", flush=True)
    rows = sorted(({**r, **figures(r)} for r in done if r.get("per_slot") == a.per_slot and r.get("mean") == a.mean), key=lambda r: (r["runner"], r["slots"], r["mode"]))
    print(
        "| runner | slots | mode | archs | start-up s | wall s | archs/h | utilisation | steady util. | submit->start s | end->durable s | flow thread s/arch: controller, submit, append, compact, checkpoint |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['runner']}{' x' + str(r['processes']) if r['runner'] == 'dask' else ''} | {r['slots']} | {r['mode']} | {r['archs']} | {r['startup_s']:.1f} | {r['wall_s']:.0f} | "
            f"{r['archs_per_hour']:.0f} | {r['utilisation']:.3f} | {r['steady_utilisation']:.3f} | {r['submit_to_start_s']:.3f} | {r['end_to_durable_s']:.3f} | "
            + ", ".join(f"{r.get(k + '_s_per_arch', float('nan')):.3f}" for k in ("controller", "submit", "append", "compact", "checkpoint"))
            + " |"
        )


if __name__ == "__main__":
    main()
