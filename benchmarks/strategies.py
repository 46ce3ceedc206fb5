"""Search strategies compared at equal budget (issue #14): ppo, random and evolution, each
with and without successive halving (``+sh``), all driven by the product's search loop
(``nasfcos.search.asynchronous.run_search_async``, one slot, so every run is reproducible).

Budget: proxy epochs x decoder MACs summed over the evaluations (a promoted arch resumes
from its lower rung, so it costs only the extra epochs), counted in "full evals": the cost
of one full proxy evaluation of an average random arch. A run stops before the evaluation
that would start past its budget. Wall seconds are reported too (noisy on a shared machine).

Metric, at 10/25/50/100 % of the budget: the arch the search would select then (ok rows,
the most rungs first, then the reward: ``nasfcos.search.loop``'s rule and ``top_k``'s), scored
  toy   by its noise-free full-fidelity reward, as the share of the random -> optimum gap
        it closes;
  real  by its full-fidelity reward ("best reward found"; none before one arch reaches
        the top rung).
Mean and 95 % confidence interval (Student t) over seeds. For successive halving also
Kendall's tau between each lower rung's rewards and the top rung's, on the archs that
reached both.

Two evaluators:

toy  (default) the reward of ``benchmarks/controller_schedule.py`` (agreement with a hidden
     arch, standardised to the paper's scale: random archs -2.3 +- 0.1, optimum ~-1.0,
     noise sd 0.02), with a model of shorter training for the rungs: at e of 15 epochs the
     standardised score is rho(e) z + sqrt(1 - rho(e)^2) u (u: a per-arch bias of short
     training, rho(e) = (e/15)^(1/3): Kendall's tau 0.40 at 3 epochs, 0.56 at 7, by
     construction) and the loss is higher by 0.5 (1 - e/15). MACs from
     ``nasfcos.model.complexity.decoder_cost`` at the paper's proxy geometry (R-50 C2-C5 of a
     384 crop, width 64, 20 classes). Rungs 3, 7, 15 epochs, eta 3.
real (``--real``) the CPU proxy task (``nasfcos.engine.proxy.evaluate_arch``) on the demo's
     features (``runs/demo/features.zarr`` when present, else a small store built here
     from the synthetic dataset with a random tiny backbone), ``--epochs`` full epochs
     (default 4) and rungs ``--rungs`` (1, 2, 4), eta 3; promoted archs resume from states
     kept by ``storage.rung_states`` in a temporary directory. A full evaluation takes ~20 s of
     one CPU core (deformable convs: several times that), so the default 16 full evals
     per run x 6 strategies x 5 seeds is about an hour on 2 idle cores.

    python benchmarks/strategies.py --small              # toy, seconds (tests/test_strategies.py)
    python benchmarks/strategies.py                      # toy: 5 seeds, 2,800 full evals (minutes)
    python benchmarks/strategies.py --real --seeds 5     # real CPU proxy, 16 full evals per run (~1 h)

Finished runs are appended to ``--rows`` (JSON lines) and skipped when the command is run
again with the same settings.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from controller_schedule import BASE, SPREAD, ToyReward  # noqa: E402  (the same toy reward)

POLICIES = ("ppo", "random", "evolution")
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
PAPER_GEOMETRY = dict(in_channels=(256, 512, 1024, 2048), sizes=((96, 96), (48, 48), (24, 24), (12, 12)), width=64, num_classes=20)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


class Exhausted(BaseException):
    """The budget is spent: stops the search loop (raised by ``submit``)."""


def t975(dof: int) -> float:
    """Student t 97.5 % quantile (dof >= 1); the nearest tabulated dof at or below, 1.96 past 30."""
    return 1.96 if dof > 30 else _T975[max(d for d in _T975 if d <= dof)]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95 % CI half-width (Student t) of the finite values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), t975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties in either ranking corrected; flows.report.plots computes it for the
    report too); NaN under 3 pairs."""
    from flows.report.plots import kendall_tau as tau_b

    return float("nan") if len(x) < 3 else tau_b(x, y)


class Memory:
    """The search loop's ``Results`` in memory (one row per arch, the most rungs kept)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def read(self):
        return None  # every run starts empty

    def append(self, rows) -> int:
        for r in rows:
            old = self.rows.get(r["arch_id"])
            if old is None or len(r.get("rung_epochs", ())) >= len(old.get("rung_epochs", ())):
                self.rows[r["arch_id"]] = r
        return len(rows)

    def compact(self) -> int:
        return len(self.rows)


def toy_record(arch, reward: float, params: int, macs: int, epochs: int, status: str = "ok", error: str = "") -> dict:
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    nan = float("nan")
    return {
        "arch_id": arch.arch_id, "arch": str(arch), "reward": reward if status == "ok" else nan, "loss_cls": nan, "loss_reg": nan,
        "loss_ctr": nan, "params": params, "macs": macs, "train_seconds": 0.0, "eval_seconds": 0.0, "peak_mem_mb": nan,
        "device": "toy", "seed": 0, "epochs": epochs, "status": status, "error": error, "started_at": now, "finished_at": now,
    }  # fmt: skip


@functools.lru_cache(maxsize=None)
def _toy(seed: int, head: str, standardise_over: int) -> ToyReward:
    """The hidden arch and the standardisation of seed ``seed`` (over 4,000 random archs:
    seconds), once per process; only its noise-free parts are used."""
    return ToyReward(seed, head, standardise_over)


class ToyEvaluator:
    """The toy reward with fidelities (module docstring) and the paper-geometry MACs."""

    def __init__(self, seed: int, head: str, full: int, standardise_over: int = 4000) -> None:
        from nasfcos.model.complexity import decoder_cost

        self.toy, self.full, self.seed = _toy(seed, head, standardise_over), full, seed
        self.cost = lambda arch: decoder_cost(arch, **PAPER_GEOMETRY)
        self.noise = np.random.default_rng(40_000 + seed)

    def z(self, arch, epochs: int) -> float:
        z = (self.toy.agreement(np.asarray(arch.tokens())) - self.toy.mu) / self.toy.sd
        if epochs >= self.full:
            return z
        rho = (epochs / self.full) ** (1 / 3)
        u = np.random.default_rng([int(arch.arch_id, 16), self.seed]).normal()  # the arch's short-training bias
        return rho * z + math.sqrt(1 - rho**2) * u

    def clean(self, arch, epochs: int) -> float:
        return BASE + SPREAD * self.z(arch, epochs) - 0.5 * (1 - min(epochs, self.full) / self.full)

    def true_value(self, arch) -> float:
        """Noise-free full-fidelity reward: what selecting this arch is worth."""
        return self.clean(arch, self.full)

    def __call__(self, arch, epochs: int, resume_from: int) -> tuple[dict, int]:
        c = self.cost(arch)
        reward = self.clean(arch, epochs) + float(self.noise.normal(0.0, 0.02))
        return toy_record(arch, reward, c.params, c.macs, epochs), c.macs


class RealEvaluator:
    """The CPU proxy task on a small feature store; states of promoted archs in ``storage.rung_states``."""

    def __init__(self, features: str, states_dir: str, full: int, batch_size: int) -> None:
        import torch

        from nasfcos.engine.proxy import ProxyConfig, prepare_split
        from nasfcos.model.backbones import LEVELS
        from storage.features import FeatureStore
        from storage.rung_states import RungStates

        store = FeatureStore.open(features)
        self.k = int(store.attrs["num_classes"])
        splits = []
        for split in ("meta_train", "meta_val"):
            d = store.read_split(split, levels=list(LEVELS))
            splits.append(prepare_split({lv: torch.from_numpy(d["features"][lv]) for lv in LEVELS}, d["boxes"], d["labels"], num_classes=self.k))
        self.train, self.val = splits
        self.states, self.full = RungStates(states_dir), full
        self.cfg = lambda epochs: ProxyConfig(width=64, batch_size=batch_size, eval_batch_size=batch_size, epochs=epochs)

    def true_value(self, arch) -> float:
        return float("nan")  # unknown: the real metric is the observed full-fidelity reward

    def __call__(self, arch, epochs: int, resume_from: int) -> tuple[dict, int]:
        from nasfcos.engine.proxy import evaluate_arch
        from nasfcos.search.halving import pack_state, unpack_state

        data = self.states.read(arch.arch_id, resume_from) if resume_from else None
        keep = (lambda s: self.states.write(arch.arch_id, epochs, pack_state(s))) if epochs < self.full else None
        rec = evaluate_arch(arch, self.train, self.val, num_classes=self.k, cfg=self.cfg(epochs), resume=unpack_state(data) if data else None, keep_state=keep)
        if resume_from:
            self.states.drop(arch.arch_id, resume_from)
        return rec, int(rec["macs"])


def run(policy: str, sh: bool, seed: int, setting: dict) -> dict:
    """One search at one budget; returns the trace summary (see the module docstring)."""
    import torch

    from nasfcos.search.asynchronous import run_search_async
    from nasfcos.search.loop import SearchConfig
    from nasfcos.search.policies import build_policy

    torch.set_num_threads(1)
    full, rungs = setting["epochs"], tuple(setting["rungs"]) if sh else ()
    work = tempfile.mkdtemp(prefix="strategies-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)  # controller.pt is fsynced per draw
    if setting["real"]:
        ev = RealEvaluator(setting["features"], os.path.join(work, "run"), full, setting["batch_size"])
    else:
        ev = ToyEvaluator(seed, setting["head"], full, 500 if setting.get("small") else 4000)
    budget = setting["budget"] * full * setting["unit_macs"]
    spent, trace, t0 = 0.0, [], time.perf_counter()

    def submit(job):
        nonlocal spent
        epochs = job.epochs or full
        start = rungs[job.rung - 1] if job.rung else 0
        if spent >= budget:
            raise Exhausted
        record, macs = ev(job.arch, epochs, start)
        spent += (epochs - start) * macs
        trace.append((spent, job.arch, epochs, record["reward"] if record["status"] == "ok" else float("nan")))
        f: Future = Future()
        f.set_result(record)
        return f

    # a policy that only draws archs it has seen spends nothing: stop it after twice the draws the budget pays for
    max_samples = int(2 * setting["budget"] * full / (rungs[0] if sh else full))
    cfg = SearchConfig(total_archs=10**6, archs_per_step=8, rungs=rungs, eta=setting["eta"], max_samples=max_samples)
    pol = build_policy(policy, seed=seed, head=setting["head"], ops=setting.get("ops"))
    try:
        run_search_async(policy=pol, submit=submit, slots=1, results=Memory(), state_path=os.path.join(work, "c.pt"), cfg=cfg)
    except Exhausted:
        pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    # replay: the arch selected at each budget fraction, and each arch's reward per epochs
    per_arch: dict[str, dict[int, float]] = {}
    archs: dict[str, object] = {}
    best_at, incumbent, i = {}, None, 0
    for frac in FRACTIONS:
        while i < len(trace) and trace[i][0] <= frac * budget + 1e-9:
            _, arch, epochs, reward = trace[i]
            per_arch.setdefault(arch.arch_id, {})[epochs] = reward
            archs[arch.arch_id] = arch
            i += 1
        ok = {a: r for a, r in per_arch.items() if np.isfinite(r[max(r)])}
        incumbent = max(sorted(ok), key=lambda a: (len(ok[a]), ok[a][max(ok[a])]), default=None)
        if setting["real"]:
            tops = [r[full] for r in ok.values() if full in r]
            best_at[str(frac)] = max(tops) if tops else float("nan")
        else:
            best_at[str(frac)] = (ev.true_value(archs[incumbent]) - BASE) / (ev.toy.optimum - BASE) if incumbent else float("nan")
    taus = {}
    if sh:
        for e in rungs[:-1]:
            both = [r for r in per_arch.values() if e in r and full in r and np.isfinite(r[e]) and np.isfinite(r[full])]
            taus[f"tau_{e}_{full}"] = kendall_tau([r[e] for r in both], [r[full] for r in both])
            taus[f"n_{e}_{full}"] = len(both)
    return {
        "strategy": policy + ("+sh" if sh else ""), "seed": seed, "best": best_at, "archs": len(per_arch), "evaluations": len(trace),
        "spent_full_evals": spent / (full * setting["unit_macs"]), "seconds": seconds, **taus,
    }  # fmt: skip


def unit_macs(setting: dict) -> float:
    """Mean decoder MACs of random archs at the setting's geometry (the budget unit)."""
    from nasfcos.arch import Arch
    from nasfcos.model.complexity import decoder_cost
    from nasfcos.search.policies import build_policy

    if setting.get("ops"):
        archs = [x.arch for x in build_policy("random", seed=12345, head=setting["head"], ops=setting["ops"]).sample(200)]
    else:
        rng = np.random.default_rng(12345)
        archs = [Arch.random(rng, head=setting["head"]) for _ in range(200)]
    if setting["real"]:
        from nasfcos.model.backbones import LEVELS
        from storage.features import FeatureStore

        store = FeatureStore.open(setting["features"])
        chw = [store.levels[lv] for lv in LEVELS]
        geometry = dict(in_channels=[c for c, _, _ in chw], sizes=[(h, w) for _, h, w in chw], width=64, num_classes=int(store.attrs["num_classes"]))
    else:
        geometry = PAPER_GEOMETRY
    return float(np.mean([decoder_cost(a, **geometry).macs for a in archs]))


def demo_ops() -> list[str] | None:
    """The demo preset's ``search.ops`` (its CPU-cheap space), read without importing flows/."""
    import yaml

    return (yaml.safe_load((ROOT / "flows/configs/demo.yaml").read_text()).get("search") or {}).get("ops")


def small_feature_store(path: Path) -> Path:
    """A demo-sized feature store (48 meta-train / 16 meta-val, 64x64 crops) from the synthetic
    dataset and a random tiny backbone, for a clone without ``runs/demo``."""
    import torch

    from nasfcos.data import COCODetection, make_synthetic
    from nasfcos.engine.materialise import FeatureComputer, meta_split, proxy_transforms
    from nasfcos.model.backbones import build_backbone
    from storage.features import FeatureStore, materialise

    if (path / "zarr.json").exists():
        return path
    torch.manual_seed(0)
    syn = make_synthetic(path.parent / "synthetic", num_train=64, num_val=8, image_size=(64, 96), seed=0)
    ds = COCODetection(syn["train_json"], syn["image_root"], transforms=proxy_transforms(64))
    tr, va = meta_split(len(ds), train_size=48, seed=0)
    backbone = build_backbone("tiny")
    levels = {"C2": (16, 16, 16), "C3": (32, 8, 8), "C4": (64, 4, 4), "C5": (128, 2, 2)}
    store = FeatureStore.create(path, splits={"meta_train": len(tr), "meta_val": len(va)}, levels=levels, shard_size=16, attrs={"seed": 0, "num_classes": 3})
    for split, idx in (("meta_train", tr), ("meta_val", va)):
        materialise(store, split, FeatureComputer(backbone, ds, idx, seed=0, batch_size=16))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="toy, 2 seeds, 60 full evals, standardised over 500 archs: a smoke run for the test suite")
    p.add_argument("--real", action="store_true", help="the CPU proxy on the demo's features instead of the toy")
    p.add_argument("--seeds", type=int, default=None, help="seeds per strategy (default 5; --small 2)")
    p.add_argument("--budget", type=float, default=None, help="full evals per run (default: toy 2800, real 16, --small 60)")
    p.add_argument("--epochs", type=int, default=None, help="full proxy epochs (toy 15, real 4)")
    p.add_argument("--rungs", type=int, nargs="+", default=None, help="successive halving rungs in epochs, the last = --epochs (toy 3 7 15, real 1 2 4)")
    p.add_argument("--eta", type=int, default=3)
    p.add_argument("--strategies", nargs="+", default=[f"{x}{s}" for s in ("", "+sh") for x in POLICIES])
    p.add_argument("--features", default=str(ROOT / "runs/demo/features.zarr"), help="real: a feature store (built in a temp dir when absent)")
    p.add_argument("--batch-size", type=int, default=16, help="real: proxy batch size (the demo's)")
    p.add_argument("--head", default="seq", choices=("seq", "dag"))
    p.add_argument("--ops", nargs="+", default=None, help="ops the searches may use (search.ops; default: toy all, real the demo's)")
    p.add_argument("--jobs", type=int, default=2, help="processes (one thread each)")
    p.add_argument("--rows", default=None, help="finished runs, one JSON line each (default benchmarks/strategies[_real].jsonl; --small: a temp file)")
    a = p.parse_args(argv)
    real = a.real
    seeds = a.seeds or (2 if a.small else 5)
    budget = a.budget or (60 if a.small else 16 if real else 2800)
    epochs = a.epochs or (4 if real else 15)
    rungs = a.rungs or ([1, 2, 4] if real else [3, 7, 15])
    if rungs[-1] != epochs or rungs != sorted(set(rungs)) or len(rungs) < 2:
        p.error(f"--rungs {rungs} must increase and end at --epochs {epochs}")
    features = a.features
    if real and not Path(features, "zarr.json").exists():
        features = str(small_feature_store(Path(tempfile.gettempdir()) / "nasfcos-strategies" / "features.zarr"))
        print(f"no feature store at {a.features}: built a small one at {features}", flush=True)
    ops = a.ops or (demo_ops() if real else None)
    setting = {"real": real, "budget": budget, "epochs": epochs, "rungs": rungs, "eta": a.eta, "head": a.head, "small": a.small}
    if ops:
        setting["ops"] = list(ops)
    if real:
        setting.update(features=os.path.abspath(features), batch_size=a.batch_size)
    setting["unit_macs"] = unit_macs(setting)
    rows_path = a.rows or (os.path.join(tempfile.mkdtemp(), "strategies.jsonl") if a.small else str(ROOT / "benchmarks" / f"strategies{'_real' if real else ''}.jsonl"))
    key = {k: v for k, v in setting.items() if k != "features"}
    done = [json.loads(line) for line in open(rows_path)] if os.path.exists(rows_path) else []
    mine = lambda r: all(r.get(k) == v for k, v in key.items())  # noqa: E731
    have = {(r["strategy"], r["seed"]) for r in done if mine(r)}
    jobs = [(s, seed) for s in a.strategies for seed in range(seeds) if (s, seed) not in have]
    with ProcessPoolExecutor(a.jobs) as pool:
        futures = [pool.submit(run, s.removesuffix("+sh"), s.endswith("+sh"), seed, setting) for s, seed in jobs]
        for f in as_completed(futures):
            row = {**f.result(), **key}
            with open(rows_path, "a") as out:  # durable as each run ends
                out.write(json.dumps(row) + "\n")
            print(f"{row['strategy']} seed {row['seed']}: best {row['best']['1.0']:.3f}, {row['archs']} archs, {row['seconds']:.0f} s", flush=True)
            done.append(row)
    rows = [r for r in done if mine(r)]
    report(rows, setting, a.strategies)


def report(rows: list[dict], setting: dict, strategies: list[str]) -> None:
    what = "best full-fidelity reward found" if setting["real"] else "share of the random -> optimum gap closed by the selected arch"
    print(
        f"\n{'real CPU proxy' if setting['real'] else 'toy reward'}: budget {setting['budget']:g} full evals "
        f"(x {setting['epochs']} epochs x {setting['unit_macs'] / 1e6:.1f} M MACs), rungs {setting['rungs']} eta {setting['eta']}, head {setting['head']}"
        + (f", ops {', '.join(setting['ops'])}" if setting.get("ops") else "")
    )
    print(f"metric: {what}; mean ± 95% CI over seeds")
    head = "| strategy | seeds | " + " | ".join(f"{int(f * 100)}% budget" for f in FRACTIONS) + " | archs | full evals spent | s/run | Kendall tau (rung vs top) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for s in strategies:
        r = [x for x in rows if x["strategy"] == s]
        if not r:
            continue
        cells = []
        for f in FRACTIONS:
            m, ci = mean_ci([x["best"][str(f)] for x in r])
            cells.append(f"{m:.3f} ± {ci:.3f}")
        taus = ", ".join(f"{k.split('_')[1]}ep {mean_ci([x[k] for x in r])[0]:.2f} (n {np.mean([x['n' + k[3:]] for x in r]):.0f})" for k in sorted(r[0]) if k.startswith("tau_"))
        print(
            f"| {s} | {len(r)} | " + " | ".join(cells) + f" | {np.mean([x['archs'] for x in r]):.0f} | {np.mean([x['spent_full_evals'] for x in r]):.0f} "
            f"| {np.mean([x['seconds'] for x in r]):.0f} | {taus or '-'} |"
        )


if __name__ == "__main__":
    main()
