"""Async staleness (issue #25 item 6): does the async search learn less from slow archs?

In ``search.mode: async`` an arch's result feeds the update after it finishes, so a slow
arch was sampled by a policy more updates older than a fast one (64 slots, 8 results per
update: ~8 updates for an average arch, ~4x that for the slowest). PPO's ratio against
the stored sampling log-probability is clipped at 1 +- 0.1: a stale sample whose ratio has
left the band in its advantage's direction gives no gradient. If slow archs are the good
ones, async could then learn them late or never. This measures it on the product:

- the product's loops, ``nasfcos.search.sync.run_search`` and ``nasfcos.search.asynchronous.run_search_async``
  (async), with the real controller (``PPOController``, default config) and a
  simulated clock: each evaluation takes a time from the cost model below, and no
  evaluation or controller call takes any simulated time (the best case for async,
  whose controller runs between results). Async: the loop waits for results on a
  ``queue.SimpleQueue``; this script swaps the loop module's ``queue`` for one whose
  ``get`` advances the clock to the next finishing evaluation (an event queue) and fires
  its future's done callback, so the loop runs unchanged, one thread, no sleeps. Sync:
  the ``evaluate`` callback list-schedules a step's archs on the slots and advances the
  clock by the step's makespan. Sync draws max(8, slots) archs per step (one step fills
  every slot, as ``benchmarks/search_scaling.py``); async updates every 8 results.
- cost model: an evaluation takes the sum over the arch's op tokens of skip_connect /
  conv1x1 1, sep_conv_3x3(_dil3) 2, sep_conv_5x5_dil6 / conv3x3 3, def_conv_3x3 20 (the
  deformable conv ~20x the cheapest op, as on the CPU proxy), times a lognormal jitter
  (sd 0.1), in units of a random arch's mean (random archs: ~107 op units; no deformable
  op: ~40; all deformable: 400).
- reward: ``benchmarks/controller_schedule.py``'s toy (agreement with a hidden arch,
  standardised over 4,000 random archs: random -2.3 +- 0.1, noise sd 0.02), hidden arch
  random except its op tokens: ``slow-good`` every op token is def_conv_3x3 (the optimum
  is the slowest arch), ``slow-bad`` none is (its ops random among the others).

Metrics, over the archs in the order they were issued (duplicates included: what the
policy proposed): the share of the random -> optimum gap closed by the noise-free reward
of the last 100 (and of the best arch), the share of op tokens that are def_conv_3x3 in
the second half (random archs: 0.19), the simulated time to the budget (units: one
random arch's evaluation, so random archs at perfect use take budget / slots), the gap
closed by the last 100 issued before the time the faster mode of the pair (same cost
model, slots, seed) took, and two diagnostics of the mechanism, for the slower and the
faster half of the archs (by cost): the mean staleness (controller updates between
sampling and learning) and the share of samples whose clip zeroes their gradient at the
first PPO epoch (ratio past 1 +- clip in their advantage's direction). Mean and 95 % CI
(Student t, ``benchmarks/strategies.py``'s ``mean_ci``) over seeds.

    nice python benchmarks/staleness.py                     # 5 seeds, 1,400 archs, sync/async x 1/16/64 slots x 2 cost models
    nice python benchmarks/staleness.py --small             # seconds: 1 seed, 160 archs (a smoke run)
    nice python benchmarks/staleness.py --seeds 10 --modes async --slots 1 64   # more seeds where it matters
    nice python benchmarks/staleness.py --correction decoupled --modes async --slots 16 64 --seeds 10

``--correction``: the controller's ``stale_correction`` (``none``: plain PPO; ``decoupled``:
decoupled PPO, see ``PPOController.update``; default: the controller's default), with
``--cap`` its ``stale_weight_cap``. At one slot every sample is fresh and both are the
same search, so the 1-slot reference below is the plain one.

The report ends with the bias check, per cost model against the same seed's 1-slot run
(sync and async are the same search there): the last-100 gap closed relative to it (and
the paired difference slow-good - slow-bad), and the slow-op share of the last 100 archs
minus the 1-slot run's when it had closed the same gap (its trace, interpolated). A
search that learns slower but is not biased matches the 1-slot run at equal progress; one
biased against slow archs proposes fewer slow ops there under both cost models. (The move
of the slow-op share itself is no measure: the op tokens' softmax makes a move from 0.19
towards 1 and one towards 0 unequal for equal progress.)

Finished runs are appended to ``--rows`` (JSON lines) and skipped when run again with the same settings.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import json
import os
import shutil
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from controller_schedule import BASE, ToyReward  # noqa: E402  (the same toy reward)
from strategies import Memory, mean_ci, toy_record  # noqa: E402

from nasfcos.search.controller import ControllerConfig, PPOController  # noqa: E402

OP_COST = {"skip_connect": 1, "conv1x1": 1, "sep_conv_3x3": 2, "sep_conv_3x3_dil3": 2, "sep_conv_5x5_dil6": 3, "conv3x3": 3, "def_conv_3x3": 20}
SLOW = "def_conv_3x3"
MODELS = ("slow-good", "slow-bad")
MODES = ("sync", "async")
JITTER = 0.1
TRACE_EVERY = 50


def token_tables(head: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per token: each choice's cost in op units and whether it is the slow op (zeros for non-op tokens)."""
    from nasfcos.arch import FPN_OPS, HEAD_OPS, token_space

    costs, slow = [], []
    for tok in token_space(head).tokens:
        is_op = ".op" in tok.name and not tok.name.endswith((".id1", ".id2"))
        ops = (FPN_OPS if tok.name.startswith("fpn") else HEAD_OPS) if is_op else ()
        costs.append(np.array([OP_COST[o] for o in ops] if is_op else [0] * tok.choices, dtype=float))
        slow.append(np.array([o == SLOW for o in ops] if is_op else [False] * tok.choices))
    return costs, slow


class CostedToy(ToyReward):
    """The toy reward with the hidden arch's op tokens all slow (``slow-good``) or none
    (``slow-bad``), and the cost model (module docstring)."""

    def __init__(self, seed: int, head: str, model: str, standardise_over: int = 4000) -> None:
        from nasfcos.arch import Arch
        from nasfcos.search.policies import RandomPolicy

        self.costs, self.slow = token_tables(head)
        rng = np.random.default_rng(10_000 + seed)
        target = list(Arch.random(rng, head=head).tokens())
        for t, slow in enumerate(self.slow):
            if slow.any():
                target[t] = int(np.flatnonzero(slow)[0]) if model == "slow-good" else int(rng.choice(np.flatnonzero(~slow)))
        self.target = np.asarray(target)
        randoms = [s.tokens for s in RandomPolicy(seed=20_000 + seed, head=head).sample(standardise_over)]
        agree = [self.agreement(t) for t in randoms]
        self.mu, self.sd = float(np.mean(agree)), float(np.std(agree))
        self.unit = float(np.mean([self.op_units(t) for t in randoms]))  # a random arch's mean cost
        self.random_slow = float(np.mean([self.slow_share(t) for t in randoms]))
        self.noise = np.random.default_rng(30_000 + seed)

    def op_units(self, tokens: np.ndarray) -> float:
        return float(sum(c[v] for c, v in zip(self.costs, tokens, strict=True)))

    def slow_share(self, tokens: np.ndarray) -> float:
        """Share of the op tokens that chose the slow op."""
        return float(sum(s[v] for s, v in zip(self.slow, tokens, strict=True))) / sum(1 for s in self.slow if s.any())


class SimFuture:
    """A finished-at-a-simulated-time evaluation: what the async loop needs of a future."""

    def __init__(self, record: dict) -> None:
        self.record, self.callbacks = record, []

    def add_done_callback(self, fn) -> None:
        self.callbacks.append(fn)

    def result(self) -> dict:
        return self.record

    def fire(self) -> None:
        for fn in self.callbacks:
            fn(self)


class Clock:
    """Simulated time: evaluations end at start + their cost; ``queue_module`` stands in for
    the loop's ``queue`` (its ``get`` moves the clock to the next end and fires that future)."""

    def __init__(self, toy: CostedToy, seed: int) -> None:
        self.toy, self.now, self.events, self.seq = toy, 0.0, [], 0
        self.jitter = np.random.default_rng(50_000 + seed)
        clock = self

        class SimQueue:
            def __init__(self) -> None:
                self.items = collections.deque()

            def put(self, item) -> None:
                self.items.append(item)

            def get(self, timeout=None):
                if not self.items:
                    end, _, future = heapq.heappop(clock.events)  # the loop waits: the next evaluation ends
                    clock.now = end
                    future.fire()
                return self.items.popleft()

        import queue

        self.queue_module = types.SimpleNamespace(SimpleQueue=SimQueue, Empty=queue.Empty)

    def evaluate(self, arch) -> tuple[dict, float]:
        """The record (noisy toy reward) and the duration of one evaluation."""
        tokens = np.asarray(arch.tokens())
        duration = self.toy.op_units(tokens) / self.toy.unit * float(self.jitter.lognormal(0.0, JITTER))
        return toy_record(arch, self.toy(tokens), 0, 0, 1), duration

    def submit(self, job) -> SimFuture:
        """Async mode's ``submit``: the evaluation ends at now + its duration."""
        record, duration = self.evaluate(job.arch)
        future = SimFuture(record)
        heapq.heappush(self.events, (self.now + duration, self.seq, future))
        self.seq += 1
        return future

    def sync_evaluator(self, slots: int):
        """Sync mode's ``evaluate``: the step's archs list-scheduled on ``slots``; yields
        records as they end; the clock moves on by the makespan."""

        def evaluate(jobs):
            free = [self.now] * slots
            ends = []
            for job in jobs:
                record, duration = self.evaluate(job.arch)
                start = heapq.heappop(free)
                heapq.heappush(free, start + duration)
                ends.append((start + duration, len(ends), record))
            for end, _, record in sorted(ends):
                self.now = end
                yield record

        return evaluate


class Recorder:
    """The controller as the loop sees it, recording each sample's draw (time, controller
    step) and, when it feeds an update, its staleness and whether its clip is active."""

    def __init__(self, inner, toy: CostedToy, clock: Clock) -> None:
        self.inner, self.toy, self.clock = inner, toy, clock
        self.drawn: dict[tuple[str, float], list[tuple[int, float, int]]] = collections.defaultdict(list)
        self.draws = self.updates = 0
        self.fed: list[dict] = []

    def sample(self, n: int):
        out = self.inner.sample(n)
        for s in out:
            self.drawn[(str(s.arch), s.logp)].append((self.draws, self.clock.now, self.updates))
            self.draws += 1
        return out

    def update(self, samples, rewards):
        import torch

        with torch.no_grad():
            logp, _ = self.inner.policy.score(torch.as_tensor(np.stack([s.tokens for s in samples])), torch.as_tensor(np.stack([s.masks for s in samples])))
        ratio = torch.exp(logp - torch.tensor([s.logp for s in samples])).tolist()
        r = np.asarray(rewards, dtype=float)
        baseline = float(r.mean()) if self.inner.baseline is None else self.inner.baseline
        clip = self.inner.cfg.clip
        for s, v, q in zip(samples, r, ratio, strict=True):
            order, t, step = self.drawn[(str(s.arch), s.logp)].pop(0)
            adv = v - baseline if self.inner.cfg.update == "batch" else float("nan")
            self.fed.append(
                {
                    "order": order, "time": t, "stale": self.updates - step, "cost": self.toy.op_units(s.tokens), "clean": self.toy.clean(s.tokens),
                    "slow": self.toy.slow_share(s.tokens), "zeroed": (adv > 0 and q > 1 + clip) or (adv < 0 and q < 1 - clip),
                }
            )  # fmt: skip
        self.updates += 1
        return self.inner.update(samples, rewards)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def run(mode: str, slots: int, model: str, seed: int, setting: dict) -> dict:
    """One search of ``setting['archs']`` unique archs; the module docstring's metrics."""
    import torch

    from nasfcos.search import asynchronous, loop, sync

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    toy = CostedToy(seed, setting["head"], model, setting["standardise_over"])
    clock = Clock(toy, seed)
    extra = {"stale_weight_cap": setting["cap"]} if "cap" in setting else {}
    policy = Recorder(PPOController(ControllerConfig(stale_correction=setting["correction"], **extra), seed=seed, head=setting["head"]), toy, clock)
    per_step = 8 if mode == "async" else max(8, slots)
    cfg = loop.SearchConfig(total_archs=setting["archs"], archs_per_step=per_step)
    work = tempfile.mkdtemp(prefix="staleness-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)  # controller.pt is fsynced per draw
    try:
        state = os.path.join(work, "c.pt")
        if mode == "sync":
            sync.run_search(policy=policy, evaluate=clock.sync_evaluator(slots), results=Memory(), state_path=state, cfg=cfg)
        else:
            with mock.patch.object(loop, "queue", clock.queue_module):
                asynchronous.run_search_async(policy=policy, submit=clock.submit, slots=slots, results=Memory(), state_path=state, cfg=cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fed = sorted(policy.fed, key=lambda f: f["order"])  # issue order
    gap = toy.optimum - BASE
    clean = np.array([f["clean"] for f in fed])
    trace = []  # (issue time, gap closed by the last 100, their slow share) every TRACE_EVERY archs
    for i in range(100, len(fed) + 1, TRACE_EVERY):
        trace.append([round(fed[i - 1]["time"], 3), round((float(clean[i - 100 : i].mean()) - BASE) / gap, 4), round(float(np.mean([f["slow"] for f in fed[i - 100 : i]])), 4)])
    cut = float(np.median([f["cost"] for f in fed]))
    slow_half, fast_half = [f for f in fed if f["cost"] > cut], [f for f in fed if f["cost"] <= cut]
    return {
        "mode": mode, "slots": slots, "model": model, "seed": seed, "issued": len(fed), "updates": policy.updates,
        "last100_gap_closed": (float(clean[-100:].mean()) - BASE) / gap, "best_gap_closed": (float(clean.max()) - BASE) / gap,
        "slow_share_2nd_half": float(np.mean([f["slow"] for f in fed[len(fed) // 2 :]])), "random_slow_share": toy.random_slow,
        "time": clock.now, "trace": trace,
        "stale_slow": float(np.mean([f["stale"] for f in slow_half])), "stale_fast": float(np.mean([f["stale"] for f in fast_half])),
        "zeroed_slow": float(np.mean([f["zeroed"] for f in slow_half])), "zeroed_fast": float(np.mean([f["zeroed"] for f in fast_half])),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def slow_at_gap(row: dict, gap: float) -> float:
    """The slow-op share of the last 100 archs when the run had first closed ``gap`` (its trace's
    best-so-far gap, interpolated between points)."""
    gaps = np.maximum.accumulate([g for _, g, _ in row["trace"]])
    shares = [s for _, _, s in row["trace"]]
    i = int(np.searchsorted(gaps, gap))
    if i == 0 or i >= len(gaps):
        return shares[0] if i == 0 else float("nan")
    f = (gap - gaps[i - 1]) / max(gaps[i] - gaps[i - 1], 1e-9)
    return shares[i - 1] + f * (shares[i] - shares[i - 1])


def gap_at(row: dict, t: float) -> float:
    """The gap closed by the last 100 archs issued by time ``t`` (the trace's last point at or before it)."""
    points = [g for when, g, _ in row["trace"] if when <= t + 1e-9]
    return points[-1] if points else float("nan")


def report(rows: list[dict], setting: dict, one_slot: dict) -> None:
    """The table, then the bias check against ``one_slot`` ((model, seed) -> the plain 1-slot async run)."""
    print(
        f"\ntoy reward, {setting['archs']} archs, head {setting['head']}, controller defaults"
        + f", stale_correction {setting['correction']}"
        + (f" (cap {setting['cap']:g})" if "cap" in setting else "")
        + f"; mean ± 95% CI over seeds; random archs' slow share {np.mean([r['random_slow_share'] for r in rows]):.3f}"
    )
    print(
        "| cost model | slots | mode | seeds | last-100 gap closed | best gap closed | slow-op share, 2nd half | time to budget | gap closed at the faster mode's time | staleness slow / fast half | clip-zeroed slow / fast half |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ends = {(r["model"], r["slots"], r["seed"], r["mode"]): r["time"] for r in rows}
    for model in MODELS:
        for slots in setting["slots"]:
            for mode in MODES:
                r = sorted((x for x in rows if (x["model"], x["slots"], x["mode"]) == (model, slots, mode)), key=lambda x: x["seed"])
                if not r:
                    continue
                cell = lambda k, r=r, d=3: "{:.{d}f} ± {:.{d}f}".format(*mean_ci([x[k] for x in r]), d=d)  # noqa: E731
                eq = [gap_at(x, min(ends.get((model, slots, x["seed"], m), np.inf) for m in MODES)) for x in r]
                print(
                    f"| {model} | {slots} | {mode} | {len(r)} | {cell('last100_gap_closed')} | {cell('best_gap_closed')} | {cell('slow_share_2nd_half')} "
                    f"| {cell('time', d=0)} | {'{:.3f} ± {:.3f}'.format(*mean_ci(eq))} | {np.mean([x['stale_slow'] for x in r]):.1f} / {np.mean([x['stale_fast'] for x in r]):.1f} "
                    f"| {np.mean([x['zeroed_slow'] for x in r]):.3f} / {np.mean([x['zeroed_fast'] for x in r]):.3f} |"
                )
    print("\nbias check against the same seed's 1-slot run: last-100 gap closed relative to it; slow-op share minus its share at the same gap closed")
    print("| slots | mode | seeds | slow-good: gap rel. | slow-bad: gap rel. | good - bad: gap rel. | slow-good: slow share at equal gap | slow-bad: slow share at equal gap |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    ci = lambda v: "{:+.3f} ± {:.3f}".format(*mean_ci(v))  # noqa: E731
    for slots in [s for s in setting["slots"] if s > 1]:
        for mode in MODES:
            rel = {}
            for x in rows:
                base = one_slot.get((x["model"], x["seed"]))
                if (x["slots"], x["mode"]) == (slots, mode) and base is not None and base["last100_gap_closed"] > 0.1:  # a 1-slot run that learned
                    rel[(x["model"], x["seed"])] = (x["last100_gap_closed"] / base["last100_gap_closed"], x["trace"][-1][2] - slow_at_gap(base, x["trace"][-1][1]))
            seeds = sorted({seed for _, seed in rel if all((m, seed) in rel for m in MODELS)})
            if not seeds:
                continue
            gaps = [ci([rel[(m, s)][0] for s in seeds]).lstrip("+") for m in MODELS]
            diff = ci([rel[(MODELS[0], s)][0] - rel[(MODELS[1], s)][0] for s in seeds])
            slow = [ci([rel[(m, s)][1] for s in seeds]) for m in MODELS]
            print(f"| {slots} | {mode} | {len(seeds)} | {gaps[0]} | {gaps[1]} | {diff} | {slow[0]} | {slow[1]} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="1 seed, 160 archs, standardised over 500 archs: a smoke run")
    p.add_argument("--archs", type=int, default=None, help="unique archs per search (default 1400; --small 160)")
    p.add_argument("--seeds", type=int, default=None, help="default 5; --small 1")
    p.add_argument("--slots", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--correction", default=None, choices=("none", "decoupled"), help="the controller's stale_correction (default: its default)")
    p.add_argument("--cap", type=float, default=None, help="the controller's stale_weight_cap (default: its default)")
    p.add_argument("--head", default="seq", choices=("seq", "dag"))
    p.add_argument("--jobs", type=int, default=1, help="processes (one thread each)")
    p.add_argument("--rows", default=None, help="finished runs, one JSON line each (default benchmarks/staleness.jsonl; --small: a temp file)")
    a = p.parse_args(argv)
    setting = {"archs": a.archs or (160 if a.small else 1400), "head": a.head, "standardise_over": 500 if a.small else 4000, "jitter": JITTER, "op_cost": OP_COST}
    setting["correction"] = a.correction or ControllerConfig().stale_correction
    if setting["correction"] == "decoupled":
        setting["cap"] = a.cap or ControllerConfig().stale_weight_cap
    seeds = a.seeds or (1 if a.small else 5)
    rows_path = a.rows or (os.path.join(tempfile.mkdtemp(), "staleness.jsonl") if a.small else str(ROOT / "benchmarks" / "staleness.jsonl"))
    # rows from before the correction existed are plain PPO
    same = lambda r, s: all(r.get(k, "none" if k == "correction" else None) == v for k, v in s.items()) and r.get("cap") == s.get("cap")  # noqa: E731
    mine = lambda r: same(r, setting)  # noqa: E731
    done = [json.loads(line) for line in open(rows_path)] if os.path.exists(rows_path) else []
    have = {(r["mode"], r["slots"], r["model"], r["seed"]) for r in done if mine(r)}
    jobs = [(m, s, c, seed) for seed in range(seeds) for c in a.models for s in a.slots for m in a.modes if (m, s, c, seed) not in have]
    with ProcessPoolExecutor(a.jobs) as pool:
        futures = [pool.submit(run, *job, setting) for job in jobs]
        for f in as_completed(futures):
            row = {**f.result(), **setting}
            with open(rows_path, "a") as out:  # durable as each run ends
                out.write(json.dumps(row) + "\n")
            print(
                f"{row['model']} {row['mode']} x{row['slots']} seed {row['seed']}: last-100 {row['last100_gap_closed']:.3f}, "
                f"slow share {row['slow_share_2nd_half']:.3f}, time {row['time']:.0f} ({row['seconds']:.0f} s)",
                flush=True,
            )
            done.append(row)
    plain = {**{k: v for k, v in setting.items() if k != "cap"}, "correction": "none"}
    one_slot = {(r["model"], r["seed"]): r for r in done if same(r, plain) and (r["mode"], r["slots"]) == ("async", 1)}
    report([r for r in done if mine(r) and r["slots"] in a.slots and r["mode"] in a.modes and r["seed"] < seeds], {**setting, "slots": a.slots}, one_slot)


if __name__ == "__main__":
    main()
