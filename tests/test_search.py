"""Search loop: resume after a crash, no arch evaluated twice, penalties, a real tiny search."""

from collections import Counter
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
import torch

from nasfcos.controller import ControllerConfig, PPOController, RandomPolicy
from nasfcos.search import SearchConfig, load_state, run_search
from storage.results import ResultsTable


def _record(arch, reward, status="ok", error=""):
    now = datetime.now(timezone.utc)
    return {
        "arch_id": arch.arch_id, "arch": str(arch), "status": status,
        "reward": reward if status == "ok" else float("nan"),
        "loss_cls": 0.1, "loss_reg": 0.2, "loss_ctr": 0.3, "params": 1000, "macs": 2000,
        "train_seconds": 0.01, "eval_seconds": 0.01, "peak_mem_mb": 1.0, "device": "cpu", "seed": 0,
        "error": error, "started_at": now, "finished_at": now,
    }  # fmt: skip


class Evaluator:
    """Synthetic reward (token agreement with a fixed arch); counts calls per arch; can crash."""

    def __init__(self, crash_after=None, fail=()):
        self.calls = Counter()
        self.crash_after = crash_after
        self.fail = set(fail)
        self.target = np.arange(42) % 3  # the seq head space: 42 tokens

    def __call__(self, jobs):
        for a in (j.arch for j in jobs):
            if self.crash_after is not None and sum(self.calls.values()) >= self.crash_after:
                raise KeyboardInterrupt("killed")  # not an Exception: nothing may swallow it
            self.calls[a.arch_id] += 1
            if a.arch_id in self.fail:
                yield _record(a, 0.0, status="failed", error="RuntimeError: boom")
            else:
                yield _record(a, float(np.mean(np.asarray(a.tokens()) == self.target)))


def test_killed_search_resumes_without_evaluating_twice(tmp_path):
    cfg = SearchConfig(total_archs=20, archs_per_step=4)
    results = ResultsTable(tmp_path)
    first = Evaluator(crash_after=10)  # dies in the middle of step 2 (records 9, 10 of it are done)
    with pytest.raises(KeyboardInterrupt):
        run_search(policy=PPOController(seed=0), evaluate=first, results=results, state_path=tmp_path / "controller.pt", cfg=cfg)
    policy = PPOController(seed=0)
    state = load_state(tmp_path / "controller.pt", policy)
    assert state.step == 2 and state.pending is not None and len(results.read()) == 10
    second = Evaluator()
    summary = run_search(policy=policy, evaluate=second, results=results, state_path=tmp_path / "controller.pt", cfg=cfg)
    calls = first.calls + second.calls
    assert max(calls.values()) == 1  # no arch trained twice
    df = pd.read_parquet(tmp_path / "results.parquet")
    assert len(df) == df.arch_id.nunique() == summary.unique_archs == 20
    assert set(calls) == set(df.arch_id)
    assert summary.steps == 5 and load_state(tmp_path / "controller.pt", PPOController()).step == 5
    # the pending archs of the interrupted step kept their step number
    assert sorted(Counter(df.step).values()) == [4, 4, 4, 4, 4]


def test_uninterrupted_and_resumed_searches_agree(tmp_path):
    cfg = SearchConfig(total_archs=12, archs_per_step=4)
    run_search(policy=PPOController(seed=1), evaluate=Evaluator(), results=ResultsTable(tmp_path / "a"), state_path=tmp_path / "a/c.pt", cfg=cfg)
    with pytest.raises(KeyboardInterrupt):
        run_search(policy=PPOController(seed=1), evaluate=Evaluator(crash_after=6), results=ResultsTable(tmp_path / "b"), state_path=tmp_path / "b/c.pt", cfg=cfg)
    run_search(policy=PPOController(seed=1), evaluate=Evaluator(), results=ResultsTable(tmp_path / "b"), state_path=tmp_path / "b/c.pt", cfg=cfg)
    a = ResultsTable(tmp_path / "a").read().sort_values("arch_id")
    b = ResultsTable(tmp_path / "b").read().sort_values("arch_id")
    assert a.arch_id.tolist() == b.arch_id.tolist()  # the same archs were sampled


class RepeatPolicy(RandomPolicy):
    """Samples the same few archs again and again; records the rewards it is given."""

    def __init__(self):
        super().__init__(seed=0)
        self.fixed = super().sample(3)
        self.seen_rewards = []

    def sample(self, n):
        return [self.fixed[i % 3] for i in range(n)]

    def update(self, samples, rewards):
        self.seen_rewards.append(rewards)
        return {}


def test_known_archs_reuse_stored_rewards_and_failures_get_the_penalty(tmp_path):
    policy = RepeatPolicy()
    bad = policy.fixed[1].arch.arch_id
    ev = Evaluator(fail={bad})
    cfg = SearchConfig(total_archs=5, archs_per_step=4, failure_penalty=-7.0, max_samples=12)
    summary = run_search(policy=policy, evaluate=ev, results=ResultsTable(tmp_path), state_path=tmp_path / "c.pt", cfg=cfg)
    assert set(ev.calls.values()) == {1} and len(ev.calls) == 3  # 3 distinct archs, each trained once
    assert summary.unique_archs == 3 and summary.issued == 12  # stopped by max_samples
    assert all(r[1] == -7.0 for r in policy.seen_rewards)  # the failed arch feeds the penalty
    assert policy.seen_rewards[1] == policy.seen_rewards[0][:2]  # stored rewards reused (2 still needed, 2 sampled)
    row = ResultsTable(tmp_path).get(bad)
    assert row["status"] == "failed" and "boom" in row["error"] and row["reward_used"] == -7.0


def test_a_real_tiny_search_on_the_synthetic_feature_store(tmp_path, synthetic_small):
    """Materialise features into a Zarr store, then search 4 archs with PPO on the proxy task."""
    from nasfcos.backbones import build_backbone
    from nasfcos.data import COCODetection
    from nasfcos.materialise import LEVELS, FeatureComputer, meta_split, proxy_transforms
    from nasfcos.proxy import ProxyConfig, evaluate_arch, prepare_split
    from storage.features import FeatureStore, materialise

    torch.manual_seed(0)
    ds = COCODetection(synthetic_small["train_json"], synthetic_small["image_root"], transforms=proxy_transforms(64))
    tr, va = meta_split(len(ds), train_size=16, seed=0)
    backbone = build_backbone("tiny")
    levels = {"C2": (16, 16, 16), "C3": (32, 8, 8), "C4": (64, 4, 4), "C5": (128, 2, 2)}
    store = FeatureStore.create(tmp_path / "features.zarr", splits={"meta_train": len(tr), "meta_val": len(va)}, levels=levels, shard_size=8, attrs={"seed": 0})
    for split, idx in (("meta_train", tr), ("meta_val", va)):
        materialise(store, split, FeatureComputer(backbone, ds, idx, seed=0, batch_size=8))

    def load(split):
        d = store.read_split(split)
        return prepare_split({k: torch.from_numpy(d["features"][k]) for k in LEVELS}, d["boxes"], d["labels"], num_classes=3)

    train, val = load("meta_train"), load("meta_val")
    cfg = ProxyConfig(epochs=1, batch_size=8)

    def evaluate(jobs):
        for job in jobs:
            yield evaluate_arch(job.arch, train, val, num_classes=3, cfg=cfg)

    results = ResultsTable(tmp_path / "run")
    summary = run_search(
        policy=PPOController(ControllerConfig(), seed=0), evaluate=evaluate, results=results,
        state_path=tmp_path / "run/controller.pt", cfg=SearchConfig(total_archs=4, archs_per_step=2),
    )  # fmt: skip
    results.write_top_k(tmp_path / "run/top_k.parquet", k=2)
    df = pd.read_parquet(tmp_path / "run/results.parquet")
    top = pd.read_parquet(tmp_path / "run/top_k.parquet")
    assert len(df) == 4 and (df.status == "ok").all(), df.error.tolist()
    assert np.isfinite(df.reward).all() and (df.macs > 0).all() and (df.params > 0).all()
    assert len(top) == 2 and top.reward.iloc[0] == df.reward.max() == summary.best_reward
