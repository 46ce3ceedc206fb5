"""Successive halving (ASHA) in the async search loop: promotions only from a rung's top
1/eta, fidelities a prefix of the rungs, reward_used the highest-fidelity reward, no
(arch, rung) evaluated twice across a SIGKILL; the proxy resumes a promoted arch exactly."""

import math
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nasfcos.search.asynchronous import run_search_async
from nasfcos.search.halving import Ladder
from nasfcos.search.loop import SearchConfig
from nasfcos.search.policies import RandomPolicy
from nasfcos.search.rows import make_row
from nasfcos.search.state import load_state
from nasfcos.search.sync import run_search
from storage.results import ResultsTable

RUNGS, ETA = (1, 3, 9), 3


def _record(arch, reward, status="ok"):
    from helpers import record

    return record(arch, reward, status, "" if status == "ok" else "RuntimeError: boom")


def test_the_ladder_promotes_from_the_top_third_highest_rung_first():
    ladder = Ladder((1, 3, 9), 3)
    ladder.finished("a", [-2.0])
    ladder.finished("b", [-2.5])
    assert ladder.promotion() is None  # 2 finished: floor(2/3) = 0 may go on
    ladder.finished("c", [float("nan")])  # failed: ranks last
    assert ladder.promotion() == ("a", 1)
    ladder.start("a", 1)
    assert ladder.promotion() is None
    for i, r in enumerate([-1.0, -3.0, -2.2]):
        ladder.finished(f"d{i}", [r])
    assert ladder.top(0) == ["d0", "a"] and ladder.promotion() == ("d0", 1)  # a is taken already
    ladder.finished("x", [-1.5, -1.1])  # three finished in rung 1 (x, y, z): x is its top third
    ladder.finished("y", [-1.6, -1.4])
    ladder.finished("z", [-1.7, -1.2])
    assert ladder.promotion() == ("x", 2)  # the highest rung first
    with pytest.raises(ValueError, match="increasing"):
        Ladder((3, 3), 3)


class Rungs:
    """Simulated evaluations on a thread pool with rewards that depend on the arch and the
    rung (and failures of chosen (arch, rung) pairs). With ``writes_rows`` an evaluation
    writes its own row (from the job alone, as flows.search.evaluate_decoder does) and an audit line, and
    may SIGKILL the process; otherwise every promotion is checked as it is submitted: the
    arch must be in the top floor(n/eta) of the n archs its rung has finished."""

    def __init__(self, run_dir, slots, *, writes_rows=False, kill_after=None, fail=lambda job, failed: False, seconds=0.03):
        self.table, self.audit = ResultsTable(run_dir), Path(run_dir) / "evaluations.log"
        self.executor = ThreadPoolExecutor(slots)
        self.writes_rows, self.kill_after, self.fail, self.seconds = writes_rows, kill_after, fail, seconds
        self.calls, self.promotions, self.failed, self.lock = Counter(), 0, [], threading.Lock()

    @staticmethod
    def reward(arch, rung):
        base = float(np.mean(np.asarray(arch.tokens()) == np.arange(42) % 3))
        return base + 0.1 * rung + (int(arch.arch_id[:4], 16) % 97) / 1000 * (1 - rung / 2)  # the rank changes between rungs

    def submit(self, job):
        assert job.epochs == RUNGS[job.rung] and len(job.history) == job.rung
        if job.rung and not self.writes_rows:  # the table holds exactly the rows the loop has seen
            df = self.table.read()
            below = {a: r[job.rung - 1] for a, r in zip(df.arch_id, df.rung_rewards, strict=True) if len(r) >= job.rung and math.isfinite(r[job.rung - 1])}
            n = sum(len(r) >= job.rung for r in df.rung_rewards)
            top = sorted(below, key=lambda a: (-below[a], a))[: n // ETA]
            assert job.arch.arch_id in top, (job, n, top)
            self.promotions += 1
        return self.executor.submit(self.evaluate, job)

    def evaluate(self, job):
        a = job.arch
        time.sleep(self.seconds * (0.2 + (int(a.arch_id[:4], 16) % 7) / 7))
        with self.lock:
            failed = self.fail(job, self.failed)
            if failed:
                self.failed.append((a.arch_id, job.rung))
        record = _record(a, 0.0, "failed") if failed else _record(a, self.reward(a, job.rung))
        with self.lock:
            self.calls[(a.arch_id, job.rung)] += 1
            if self.writes_rows:
                self.table.append([make_row(record, step=job.step, sample=job.sample, penalty=-10.0, rungs=RUNGS[: job.rung + 1], history=job.history)])
                with open(self.audit, "a") as f:
                    f.write(f"{a.arch_id} {job.rung} pid={os.getpid()}\n")
                if self.kill_after is not None and sum(self.calls.values()) >= self.kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        return record


def _search(run_dir, pool, total=30, slots=4):
    cfg = SearchConfig(total_archs=total, archs_per_step=4, rungs=RUNGS, eta=ETA)
    with pool.executor:
        return run_search_async(
            policy=RandomPolicy(seed=0), submit=pool.submit, slots=slots, results=ResultsTable(run_dir),
            state_path=Path(run_dir) / "c.pt", cfg=cfg, evaluator_writes_rows=pool.writes_rows,
        )  # fmt: skip


def _check_rows(df):
    """One row per arch; its fidelities are a prefix of the rungs; reward_used is the reward of
    the highest one (the penalty when that evaluation failed)."""
    assert len(df) == df.arch_id.nunique()
    for row in df.itertuples():
        k = len(row.rung_epochs)
        assert list(row.rung_epochs) == list(RUNGS[:k]) and row.epochs == RUNGS[k - 1] and len(row.rung_rewards) == k
        if row.status == "ok":
            assert row.reward_used == row.reward == row.rung_rewards[-1]
        else:
            assert row.reward_used == -10.0 and math.isnan(row.rung_rewards[-1])


def test_promotions_come_from_the_top_third_of_their_rung(tmp_path):
    """4 slots, evaluations finishing in varied order: every promotion is checked as it is
    submitted (Rungs.submit); in the end each rung's final top third has gone on; failed
    archs (the first at rung 0, the first promoted to rung 1) never go on, and the rung-1
    failure keeps its rung-0 reward."""
    from nasfcos.arch import Arch

    pool = Rungs(tmp_path, 4, fail=lambda job, failed: (job.step, job.sample) == (0, 0) or (job.rung == 1 and not any(r == 1 for _, r in failed)))
    summary = _search(tmp_path, pool)
    df = ResultsTable(tmp_path).read()
    _check_rows(df)
    assert summary.unique_archs == 30 and pool.promotions == summary.promoted_now > 0 and set(pool.calls.values()) == {1}
    ladder = Ladder(RUNGS, ETA)
    for a, r in zip(df.arch_id, df.rung_rewards, strict=True):
        ladder.finished(a, list(r))
    rows = df.set_index("arch_id")
    for rung in (0, 1):  # nothing left to promote: each rung's final top third went on
        assert ladder.top(rung) and all(len(rows.rung_epochs[a]) > rung + 1 for a in ladder.top(rung))
    (zero, _), (one, _) = sorted(pool.failed, key=lambda x: x[1])
    assert rows.status[zero] == "failed" and len(rows.rung_epochs[zero]) == 1
    assert rows.status[one] == "failed" and len(rows.rung_epochs[one]) == 2 and rows.rung_rewards[one][0] == Rungs.reward(Arch.parse(rows.arch[one]), 0)
    assert (df.rung_epochs.map(len) == 3).any()
    assert ResultsTable(tmp_path).top_k(1).rung_epochs.map(len).iloc[0] == 3  # the best is judged at the top rung
    with pytest.raises(ValueError, match="async loop only"):
        run_search(policy=RandomPolicy(), evaluate=None, results=ResultsTable(tmp_path / "x"), state_path=tmp_path / "x/c.pt", cfg=SearchConfig(rungs=RUNGS))


def _killed_search(run_dir, kill_after=None):
    _search(run_dir, Rungs(run_dir, 6, writes_rows=True, kill_after=kill_after, seconds=0.4), total=24, slots=6)


def test_a_sigkilled_search_evaluates_no_arch_at_a_rung_twice(tmp_path):
    """A forked process is SIGKILLed after 14 evaluations (rung 0 and promotions); the resume
    here finishes the search: the audit holds each (arch, rung) once, rows are whole."""
    run = tmp_path / "run"
    child = multiprocessing.get_context("fork").Process(target=_killed_search, args=(run, 14))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    state = load_state(run / "c.pt", RandomPolicy())
    assert state.in_flight  # killed with evaluations in flight
    _killed_search(run)
    audit = [tuple(line.split()[:2]) for line in (run / "evaluations.log").read_text().splitlines()]
    assert max(Counter(audit).values()) == 1  # no (arch, rung) twice
    df = pd.read_parquet(run / "results.parquet")
    _check_rows(df)
    assert len(df) == 24 and sum(len(r) for r in df.rung_epochs) == len(audit)  # every evaluation is in a row
    assert (df.rung_epochs.map(len) > 1).any()
    end = load_state(run / "c.pt", RandomPolicy())
    assert not end.in_flight and not end.finished and not end.queued


def test_rung_states_are_written_whole_read_back_and_dropped(tmp_path):
    from nasfcos.search.halving import pack_state, unpack_state
    from storage.rung_states import RungStates

    states = RungStates(tmp_path)
    state = {"model": {"w": torch.arange(6.0)}, "ema_updates": 3, "generator": torch.ByteTensor([1, 2]), "epochs": 3}
    states.write("0123456789ab", 3, pack_state(state))
    assert not list((tmp_path / "rungs").glob(".tmp-*"))  # written atomically
    back = unpack_state(states.read("0123456789ab", 3))
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["ema_updates"] == 3 and back["epochs"] == 3
    assert states.read("0123456789ab", 7) is None
    states.drop("0123456789ab", 3)
    assert states.read("0123456789ab", 3) is None
    with pytest.raises(ValueError, match="bad arch id"):
        states.path("../etc", 3)
    states.write("0123456789ab", 7, b"x")
    states.clear()
    assert not (tmp_path / "rungs").exists()
