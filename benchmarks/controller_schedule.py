"""Controller update schedules compared on a toy reward with a known optimum (issue: item 6).

The paper gives no controller schedule; its ref. [14] (nas-segm-pytorch) keeps a
100-entry rollout buffer and makes ~100 minibatch-1 PPO steps per new result
(``--update buffer``); ours makes ``ppo_epochs`` full-batch steps per batch of
``archs_per_step`` results (``--update batch``). This script runs both, with the
same LSTM and learning rate, on a reward at the paper's scale:

    R(arch) = -2.3 + 0.1 * z(arch) + noise,  z = standardised agreement with a hidden arch

so random archs score -2.3 on average with a spread of 0.1 (the paper's proxy
rewards), the hidden arch is the known optimum (about -1.0), and noise (sd 0.02)
stands in for the proxy's seed noise. Metric: the share of the random -> optimum
gap closed by the noise-free reward of the last 100 sampled archs (and by the best
arch found), over a 2,800-arch budget, mean and std over seeds.

    python benchmarks/controller_schedule.py                  # 5 seeds, 2,800 archs, both schedules
    python benchmarks/controller_schedule.py --archs 700 --jobs 2

Each finished run is appended to ``--rows`` (JSON lines) and skipped when the command is
run again, so the long buffer runs (~280,000 minibatch-1 Adam steps for 2,800 archs,
about 10 ms each on one CPU core) can be spread over several sessions or machines.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import torch

from nasfcos.arch import DEFAULT_HEAD_SEARCH, Arch
from nasfcos.search.controller import ControllerConfig, PPOController
from nasfcos.search.policies import RandomPolicy

BASE, SPREAD, NOISE = -2.3, 0.1, 0.02


class ToyReward:
    """Agreement with a hidden arch, standardised over random archs, at the paper's scale."""

    def __init__(self, seed: int, head: str, standardise_over: int = 4000) -> None:
        self.target = np.asarray(Arch.random(np.random.default_rng(10_000 + seed), head=head).tokens())
        agree = [self.agreement(s.tokens) for s in RandomPolicy(seed=20_000 + seed, head=head).sample(standardise_over)]
        self.mu, self.sd = float(np.mean(agree)), float(np.std(agree))
        self.noise = np.random.default_rng(30_000 + seed)

    def agreement(self, tokens: np.ndarray) -> float:
        return float(np.mean(tokens == self.target))

    def clean(self, tokens: np.ndarray) -> float:
        return BASE + SPREAD * (self.agreement(tokens) - self.mu) / self.sd

    def __call__(self, tokens: np.ndarray) -> float:
        return self.clean(tokens) + float(self.noise.normal(0.0, NOISE))

    @property
    def optimum(self) -> float:
        return self.clean(self.target)


def run(update: str, seed: int, archs: int, per_step: int, head: str, lr: float) -> dict:
    torch.set_num_threads(1)
    reward = ToyReward(seed, head)
    policy = PPOController(ControllerConfig(update=update, lr=lr), seed=seed, head=head)
    clean: list[float] = []
    t0 = time.perf_counter()
    while len(clean) < archs:
        samples = policy.sample(min(per_step, archs - len(clean)))
        policy.update(samples, [reward(s.tokens) for s in samples])
        clean += [reward.clean(s.tokens) for s in samples]
    gap = reward.optimum - BASE
    return {
        "update": update,
        "seed": seed,
        "last100_gap_closed": (float(np.mean(clean[-100:])) - BASE) / gap,
        "best_gap_closed": (max(clean) - BASE) / gap,
        "first_half_gap_closed": (float(np.mean(clean[: archs // 2])) - BASE) / gap,
        "optimum": reward.optimum,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, default=2800)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--per-step", type=int, default=8, help="archs per controller update call (search.archs_per_step)")
    p.add_argument("--head", default=DEFAULT_HEAD_SEARCH, choices=("seq", "dag"))
    p.add_argument("--lr", type=float, default=ControllerConfig().lr)
    p.add_argument("--updates", nargs="+", default=["buffer", "batch"])
    p.add_argument("--jobs", type=int, default=2, help="processes (one thread each)")
    p.add_argument(
        "--rows", default=os.path.join(os.path.dirname(__file__), "controller_schedule.jsonl"), help="finished runs, one JSON line each; runs already there are not repeated"
    )
    a = p.parse_args()
    setting = {"archs": a.archs, "per_step": a.per_step, "head": a.head, "lr": a.lr}
    done = [json.loads(line) for line in open(a.rows)] if os.path.exists(a.rows) else []
    have = {(r["update"], r["seed"]) for r in done if all(r.get(k) == v for k, v in setting.items())}
    jobs = [(u, s) for u in a.updates for s in range(a.seeds) if (u, s) not in have]
    with ProcessPoolExecutor(a.jobs) as pool:  # a buffer run takes ~100x a batch run: those go first
        futures = [pool.submit(run, u, s, a.archs, a.per_step, a.head, a.lr) for u, s in jobs]
        for f in as_completed(futures):
            row = {**f.result(), **setting}
            with open(a.rows, "a") as out:  # durable as each run ends: a killed benchmark keeps its runs
                out.write(json.dumps(row) + "\n")
            print(f"{row['update']} seed {row['seed']}: last-100 {row['last100_gap_closed']:.3f}, best {row['best_gap_closed']:.3f} ({row['seconds']:.0f} s)", flush=True)
            done.append(row)
    rows = [r for r in done if all(r.get(k) == v for k, v in setting.items())]
    print(f"toy reward: random mean {BASE}, spread {SPREAD}, noise sd {NOISE}; {a.archs} archs, {a.per_step} per update, head {a.head}, lr {a.lr}")
    print(f"{'update':8} {'seeds':>5} {'last-100 gap closed':>22} {'best gap closed':>18} {'1st-half gap closed':>22} {'s/run':>7}")
    for u in a.updates:
        r = [x for x in rows if x["update"] == u]
        if not r:
            continue
        cell = lambda k, r=r: f"{np.mean([x[k] for x in r]):.3f} ± {np.std([x[k] for x in r]):.3f}"  # noqa: E731
        print(f"{u:8} {len(r):5d} {cell('last100_gap_closed'):>22} {cell('best_gap_closed'):>18} {cell('first_half_gap_closed'):>22} {np.mean([x['seconds'] for x in r]):7.0f}")


if __name__ == "__main__":
    main()
