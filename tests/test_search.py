"""Search loop: resume after a crash, no arch evaluated twice, penalties, a real tiny search;
the async loop: slots kept busy, duplicates, exact resubmission after a crash and a SIGKILL."""

import multiprocessing
import os
import signal
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import Evaluator, Pool, record, run_async, token_reward

from nasfcos.search.asynchronous import run_search_async
from nasfcos.search.controller import ControllerConfig, PPOController
from nasfcos.search.loop import SearchConfig
from nasfcos.search.policies import RandomPolicy
from nasfcos.search.sample import Sample
from nasfcos.search.state import load_state
from nasfcos.search.sync import run_search
from storage.results import ResultsTable


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
        self.seen = []  # (arch_id, reward) per update

    def sample(self, n):
        return [self.fixed[i % 3] for i in range(n)]

    def update(self, samples, rewards):
        self.seen_rewards.append(rewards)
        self.seen.append([(x.arch.arch_id, r) for x, r in zip(samples, rewards, strict=True)])
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
    from nasfcos.data import COCODetection
    from nasfcos.engine.materialise import LEVELS, FeatureComputer, meta_split, proxy_transforms
    from nasfcos.engine.proxy import ProxyConfig, evaluate_arch, prepare_split
    from nasfcos.model.backbones import build_backbone
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


# ---------------------------------------------------------------- async mode


class CyclePolicy(RepeatPolicy):
    """RepeatPolicy for one sample at a time: the 3 archs in turn."""

    def __init__(self):
        super().__init__()
        self.drawn = 0

    def sample(self, n):
        self.drawn += n
        return [self.fixed[i % 3] for i in range(self.drawn - n, self.drawn)]


@pytest.fixture
def one_thread():
    """Batch-1 LSTM steps are too small to share between threads: one is faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_async_search_with_one_slot_is_reproducible_across_a_crash(tmp_path, one_thread):
    """One slot: sample, evaluate, update every K; a crash after a submission resubmits that job."""
    cfg = SearchConfig(total_archs=6, archs_per_step=4)
    ppo = ControllerConfig(hidden_size=16, num_layers=1)
    a = run_async(tmp_path / "a", PPOController(ppo, seed=1), Pool(tmp_path / "a", 1), cfg, slots=1)
    with pytest.raises(KeyboardInterrupt):
        run_async(tmp_path / "b", PPOController(ppo, seed=1), Pool(tmp_path / "b", 1, crash_after=5), cfg, slots=1)
    state = load_state(tmp_path / "b/c.pt", PPOController(ppo, seed=1))
    # step 1 drew its 2 archs in one batch, on disk before either was submitted; the 5th ran,
    # the 6th was being submitted when killed
    assert state.step == 1 and len(state.queued) == 2 and not state.in_flight and len(ResultsTable(tmp_path / "b")) == 5
    pool = Pool(tmp_path / "b", 1)
    b = run_async(tmp_path / "b", PPOController(ppo, seed=1), pool, cfg, slots=1)
    assert list(pool.calls) == [Sample.from_dict(state.queued[1]["draw"]).arch.arch_id]  # exactly the unfinished one
    cols = ["arch_id", "step", "sample", "reward"]
    ra, rb = ResultsTable(tmp_path / "a").read()[cols], ResultsTable(tmp_path / "b").read()[cols]
    pd.testing.assert_frame_equal(ra, rb)  # the same archs, sampled by the same policies
    assert ra[["step", "sample"]].values.tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1]]
    assert (a.steps, a.issued, a.unique_archs, a.best_arch) == (b.steps, b.issued, b.unique_archs, b.best_arch) == (2, 6, 6, a.best_arch)
    end = load_state(tmp_path / "b/c.pt", PPOController(ppo, seed=1))
    assert not end.in_flight and not end.finished and not end.queued and [x["staleness"] for x in end.stats] == [0.0, 0.0]


def test_async_search_keeps_slots_busy_and_reuses_results_of_duplicates(tmp_path):
    """4 slots over 3 distinct archs: each is evaluated once; a known arch feeds its stored reward,
    one sampled while in flight waits for that evaluation; every sample feeds one update."""
    policy = CyclePolicy()
    bad = policy.fixed[1].arch.arch_id
    pool = Pool(tmp_path, 4, fail={bad})
    cfg = SearchConfig(total_archs=5, archs_per_step=4, failure_penalty=-7.0, max_samples=14)
    summary = run_async(tmp_path, policy, pool, cfg, slots=4)
    assert set(pool.calls.values()) == {1} and len(pool.calls) == 3
    assert summary.unique_archs == 3 and summary.issued == 14 and summary.steps == 4
    seen = [x for batch in policy.seen for x in batch]
    assert [len(b) for b in policy.seen] == [4, 4, 4, 2] and len(seen) == 14  # the last update takes the rest
    rewards = {a: r for a, r in seen}
    assert len(rewards) == 3 and rewards[bad] == -7.0  # one reward per arch, the penalty for the failed one
    assert all(r == rewards[a] for a, r in seen)

    # distinct archs: 4 evaluations at once every time, else the barrier times out
    pool = Pool(tmp_path / "many", 4, together=4)
    summary = run_async(tmp_path / "many", RandomPolicy(seed=0), pool, SearchConfig(total_archs=16, archs_per_step=4), slots=4)
    assert summary.unique_archs == summary.issued == 16 and summary.steps == 4
    df = ResultsTable(tmp_path / "many").read()
    assert len(df) == df.arch_id.nunique() == 16 and not df.duplicated(["step", "sample"]).any()


def test_sync_and_async_checkpoints_are_not_mixed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_async(tmp_path / "a", RandomPolicy(), Pool(tmp_path / "a", 2, crash_after=2), SearchConfig(total_archs=4, archs_per_step=2), slots=2)
    with pytest.raises(ValueError, match="resume it with search.mode=async"):
        run_search(policy=RandomPolicy(), evaluate=Evaluator(), results=ResultsTable(tmp_path / "a"), state_path=tmp_path / "a/c.pt")
    with pytest.raises(KeyboardInterrupt):
        run_search(policy=RandomPolicy(), evaluate=Evaluator(crash_after=1), results=ResultsTable(tmp_path / "b"), state_path=tmp_path / "b/c.pt")
    with pytest.raises(ValueError, match="sync-mode step is pending"):
        run_async(tmp_path / "b", RandomPolicy(), Pool(tmp_path / "b", 1), SearchConfig(), slots=1)


def _async_40(run_dir, kill_after=None):
    """The async search of the SIGKILL test: 40 archs, 8 evaluations in flight."""
    pool = Pool(run_dir, 8, kill_after=kill_after, seconds=0.5)  # slow enough for the loop to keep 8 in flight under load
    run_async(run_dir, RandomPolicy(seed=0), pool, SearchConfig(total_archs=40, archs_per_step=8), slots=8)


def test_sigkilled_async_search_resumes_without_evaluating_twice(tmp_path):
    """A forked process (no second import of torch) is SIGKILLed after 15 evaluations; the
    resume runs here."""
    run = tmp_path / "run"
    child = multiprocessing.get_context("fork").Process(target=_async_40, args=(run, 15))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    state = load_state(run / "c.pt", RandomPolicy())
    rows = ResultsTable(run).read()
    # on disk: submitted (in flight) or drawn for submission (queued); those without a row go on as the same jobs
    unfinished = [e for e in state.in_flight + state.queued if Sample.from_dict(e["draw"]).arch.arch_id not in set(rows.arch_id)]
    assert 15 <= len(rows) < 40 and unfinished  # killed with evaluations in flight
    _async_40(run)

    audit = [line.split() for line in (run / "evaluations.log").read_text().splitlines()]
    df = pd.read_parquet(run / "results.parquet")
    assert len(df) == df.arch_id.nunique() == 40  # none lost
    assert Counter(a for a, *_ in audit) == Counter(set(df.arch_id))  # one evaluation per arch, none twice
    assert {pid for *_, pid in audit} == {f"pid={child.pid}", f"pid={os.getpid()}"}
    resumed = df.set_index("arch_id")
    for e in unfinished:  # resubmitted as the same job
        aid = Sample.from_dict(e["draw"]).arch.arch_id
        assert (resumed.loc[aid, "step"], resumed.loc[aid, "sample"]) == (e["step"], e["sample"])
    end = load_state(run / "c.pt", RandomPolicy())
    assert not end.in_flight and not end.finished and not end.queued and end.issued == 40 and end.step == 5


def test_async_loop_appends_rows_unless_the_evaluator_wrote_them(tmp_path):
    """flows.search.evaluate_decoder writes its own row before returning (evaluator_writes_rows=True), so
    the loop then skips its append; by default the loop appends every record itself."""
    from concurrent.futures import Future as CFuture

    def submit(job):
        f = CFuture()
        f.set_result(record(job.arch, token_reward(job.arch)))  # a record, no row written
        return f

    cfg = SearchConfig(total_archs=4, archs_per_step=2)
    for writes, expected in ((False, 4), (True, 0)):
        run = tmp_path / str(writes)
        summary = run_search_async(policy=RandomPolicy(seed=0), submit=submit, slots=2, results=ResultsTable(run), state_path=run / "c.pt", cfg=cfg, evaluator_writes_rows=writes)
        assert summary.evaluated_now == 4 and len(ResultsTable(run)) == expected


# ---------------------------------------------------------------- cost constraint


def test_the_cost_constraint_keeps_over_budget_archs_from_the_evaluator(tmp_path):
    """Archs above search.max_decoder_macs are written once as over_budget rows and resampled:
    the evaluator never sees one, they do not count as evaluated archs, the policy learns
    only from evaluated ones; in both loops."""
    from functools import partial

    from nasfcos.arch import Arch
    from nasfcos.model.complexity import decoder_cost

    cost = partial(decoder_cost, in_channels=(16, 32, 64, 128), sizes=((16, 16), (8, 8), (4, 4), (2, 2)), width=64, num_classes=3)

    def price(arch):
        c = cost(arch)
        return c.params, c.macs

    limit = int(np.median([price(Arch.random(np.random.default_rng(i)))[1] for i in range(40)]))  # about half are over
    cfg = SearchConfig(total_archs=12, archs_per_step=4, max_decoder_macs=limit)

    class Seen(RandomPolicy):
        def update(self, samples, rewards):
            self.updated = getattr(self, "updated", []) + [s.arch for s in samples]
            return {}

    for mode in ("sync", "async"):
        run, policy = tmp_path / mode, Seen(seed=0)
        if mode == "sync":
            ev = Evaluator()
            summary = run_search(policy=policy, evaluate=ev, results=ResultsTable(run), state_path=run / "c.pt", cfg=cfg, cost=price)
            calls = ev.calls
        else:
            pool = Pool(run, 2)
            with pool.executor:
                summary = run_search_async(policy=policy, submit=pool.submit, slots=2, results=ResultsTable(run), state_path=run / "c.pt", cfg=cfg, cost=price)
            calls = pool.calls
        df = ResultsTable(run).read()
        over = df[df.status == "over_budget"]
        assert len(over) > 0 and (over.macs > limit).all() and over.error.str.contains("search.max_decoder_macs").all()
        assert set(calls) == set(df.arch_id[df.status == "ok"]) and not set(calls) & set(over.arch_id)
        assert all(price(Arch.parse(a))[1] <= limit for a in df.arch[df.status == "ok"])
        assert summary.unique_archs == len(calls) == 12 and not set(a.arch_id for a in policy.updated) & set(over.arch_id)
        assert load_state(run / "c.pt", RandomPolicy()).rejected >= len(over)
        assert len(df) == df.arch_id.nunique() and not df.duplicated(["step", "sample"]).any()
    with pytest.raises(ValueError, match="no cost function"):
        run_search(policy=RandomPolicy(), evaluate=Evaluator(), results=ResultsTable(tmp_path / "x"), state_path=tmp_path / "x/c.pt", cfg=cfg)
