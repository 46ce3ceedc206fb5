"""Fig. 7 of the paper on the CPU proxy: the search's reward curve with the validation-loss
reward (the paper's, §3.3) against the AP reward (§4.4.1's ablation), in sampling order.

Each search is the product's sync loop (``nasfcos.search.sync.run_search``) with the PPO
controller on the demo's features (``runs/demo/features.zarr``: make demo builds them; a
random backbone's features would give every arch AP ~0) and the demo's proxy settings
(width 64, batch 8, ``--epochs``, ``search.ops`` of demo.yaml). Every arch is trained once
and scored both ways (``ProxyConfig(reward="ap")`` records the losses too); the controller
is fed the run's reward, -loss or AP. Same seed, same first step: the two searches part
after the first update.

Reading, per reward and seed: Spearman's rho between sampling order and the reward fed to
the controller (the trend the paper looks at), and the gain of the last step's mean over
the first step's in units of the first step's standard deviation; mean and 95 % interval
over seeds (Student t). The curves (step means, mean +- interval over seeds) go to
``--plot``. The paper compares the first 1,000 of ~2,800 archs; this is --archs of them.

    python benchmarks/reward_curves.py                  # 3 seeds x 2 rewards x 32 archs (~30 min, 2 cores)
    python benchmarks/reward_curves.py --seeds 1 --archs 8   # smoke run

Rows are appended to ``--rows`` (JSON lines) and skipped when run again with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from strategies import Memory, demo_ops, mean_ci  # noqa: E402  (the same in-memory results and intervals)

REWARDS = ("loss", "ap")


def search(reward: str, seed: int, setting: dict) -> dict:
    """One sync PPO search fed ``reward``; every arch's loss and AP in sampling order."""
    import torch

    from nasfcos.engine.proxy import ProxyConfig, evaluate_arch, prepare_split
    from nasfcos.model.backbones import LEVELS
    from nasfcos.search.loop import SearchConfig
    from nasfcos.search.policies import build_policy
    from nasfcos.search.sync import run_search
    from storage.features import FeatureStore

    torch.set_num_threads(1)
    store = FeatureStore.open(setting["features"])
    k = int(store.attrs["num_classes"])
    splits = []
    for split in ("meta_train", "meta_val"):
        d = store.read_split(split, levels=list(LEVELS))
        splits.append(prepare_split({lv: torch.from_numpy(d["features"][lv]) for lv in LEVELS}, d["boxes"], d["labels"], num_classes=k))
    train, val = splits
    cfg = ProxyConfig(width=64, batch_size=8, eval_batch_size=8, epochs=setting["epochs"], reward="ap")
    trace, t0 = [], time.perf_counter()

    def evaluate(jobs):
        for job in jobs:
            rec = evaluate_arch(job.arch, train, val, num_classes=k, cfg=cfg)
            ap = rec["reward"]
            loss = rec["loss_cls"] + rec["loss_reg"] + rec["loss_ctr"]
            trace.append({"step": job.step, "sample": job.sample, "arch_id": job.arch.arch_id, "ap": ap, "neg_loss": -loss, "status": rec["status"]})
            yield {**rec, "reward": ap if reward == "ap" else (-loss if rec["status"] == "ok" else float("nan"))}

    policy = build_policy("ppo", seed=seed, ops=setting["ops"])
    with tempfile.TemporaryDirectory(prefix="reward-curves-") as work:
        run_search(
            policy=policy, evaluate=evaluate, results=Memory(), state_path=os.path.join(work, "c.pt"),
            cfg=SearchConfig(total_archs=setting["archs"], archs_per_step=setting["per_step"]),
        )  # fmt: skip
    fed = [t["ap"] if reward == "ap" else t["neg_loss"] for t in trace]
    return {"reward": reward, "seed": seed, "setting": setting, "trace": trace, "seconds": time.perf_counter() - t0, **trend(fed, setting["per_step"])}


def trend(fed: list[float], per_step: int) -> dict:
    """Spearman's rho of the fed reward against sampling order; last step's mean gain over the
    first's, in first-step standard deviations."""
    v = np.asarray(fed, dtype=float)
    ok = np.isfinite(v)
    order = np.arange(len(v))[ok]
    # Pearson of average ranks (ties share theirs); NaN for a constant reward
    rho = float(pd.Series(order).rank().corr(pd.Series(v[ok]).rank())) if ok.sum() >= 3 else float("nan")
    first, last = v[:per_step][np.isfinite(v[:per_step])], v[-per_step:][np.isfinite(v[-per_step:])]
    gain = float((last.mean() - first.mean()) / first.std(ddof=1)) if len(first) > 1 and len(last) and first.std(ddof=1) > 0 else float("nan")
    return {"spearman": rho, "gain_sd": gain}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, reward, label in zip(axes, REWARDS, ("-(L_cls + L_reg + L_ctr) on meta-val", "AP on meta-val"), strict=True):
        runs = [r for r in rows if r["reward"] == reward]
        if not runs:
            continue
        key = "ap" if reward == "ap" else "neg_loss"
        per_step = runs[0]["setting"]["per_step"]
        steps = min(len(r["trace"]) for r in runs) // per_step
        means = np.array([[np.nanmean([t[key] for t in r["trace"][s * per_step : (s + 1) * per_step]]) for s in range(steps)] for r in runs])
        x = (np.arange(steps) + 1) * per_step
        m = np.nanmean(means, axis=0)
        ci = np.array([mean_ci(list(means[:, s]))[1] for s in range(steps)])
        ax.plot(x, m, marker="o", label=f"mean of {len(runs)} seeds")
        if len(runs) > 1:
            ax.fill_between(x, m - ci, m + ci, alpha=0.25, label="95 % interval")
        for r in means:
            ax.plot(x, r, color="grey", alpha=0.35, linewidth=0.8)
        ax.set_title(f"reward = {reward}")
        ax.set_xlabel("archs sampled")
        ax.set_ylabel(f"step mean of {label}")
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 7 on the CPU proxy: search reward in sampling order")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default=str(ROOT / "runs/demo/features.zarr"), help="a feature store with a finetuned backbone's features (make demo)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--archs", type=int, default=32, help="unique archs per search")
    p.add_argument("--per-step", type=int, default=4, help="archs per controller update")
    p.add_argument("--epochs", type=int, default=4, help="proxy epochs (the demo's)")
    p.add_argument("--jobs", type=int, default=2, help="searches at once, one core each")
    p.add_argument("--rows", default=str(ROOT / "benchmarks/reward_curves.jsonl"))
    p.add_argument("--plot", default=str(ROOT / "benchmarks/reward_curves.png"))
    a = p.parse_args(argv)
    if not (Path(a.features) / "zarr.json").exists():
        sys.exit(f"{a.features}: no feature store; run `make demo` first (its finetuned backbone's features)")
    setting = {"features": str(Path(a.features).resolve()), "archs": a.archs, "per_step": a.per_step, "epochs": a.epochs, "ops": demo_ops()}
    rows_path = Path(a.rows)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    done = {(r["reward"], r["seed"]) for r in rows if r["setting"] == setting}
    todo = [(reward, seed) for seed in range(a.seeds) for reward in REWARDS if (reward, seed) not in done]
    with ProcessPoolExecutor(a.jobs) as pool:
        for row in pool.map(search, [r for r, _ in todo], [s for _, s in todo], [setting] * len(todo)):
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(f"reward={row['reward']} seed={row['seed']}: spearman {row['spearman']:+.3f}, gain {row['gain_sd']:+.2f} sd ({row['seconds']:.0f} s)", flush=True)
    rows = [r for r in rows if r["setting"] == setting]
    print(f"\n{len(rows)} searches of {a.archs} archs, {a.per_step} per update, {a.epochs} proxy epochs ({setting['features']})")
    print("| reward fed to PPO | seeds | Spearman rho (order, reward) | last step vs first, in first-step sd |")
    print("|---|---|---|---|")
    for reward in REWARDS:
        runs = [r for r in rows if r["reward"] == reward]
        rho, rho_ci = mean_ci([r["spearman"] for r in runs])
        gain, gain_ci = mean_ci([r["gain_sd"] for r in runs])
        print(f"| {reward} | {len(runs)} | {rho:+.3f} ± {rho_ci:.3f} | {gain:+.2f} ± {gain_ci:.2f} |")
    plot(rows, Path(a.plot))
    print(f"curves: {a.plot}")


if __name__ == "__main__":
    main()
