"""Exactly once, in the search loop (issue #26, faults 1-5): an arch gets one row and feeds
the controller once whatever is lost, re-run or resumed; failure budgets per arch and per
worker; an out-of-memory beside others is re-run alone; sync waits time out."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import pytest
from helpers import Pool, record, run_async, token_reward

from nasfcos.errors import EvaluationLost
from nasfcos.search.failures import SearchHalted
from nasfcos.search.loop import SearchConfig
from nasfcos.search.policies import RandomPolicy
from nasfcos.search.state import loop_state
from nasfcos.search.sync import run_search
from storage.results import ResultsTable


class CountingPolicy(RandomPolicy):
    """A random policy that counts the samples each update is fed, per arch."""

    def __init__(self, seed):
        super().__init__(seed=seed)
        self.fed = Counter()
        self.drawn = Counter()

    def sample(self, n):
        out = super().sample(n)
        self.drawn.update(s.arch.arch_id for s in out)
        return out

    def update(self, samples, rewards):
        self.fed.update(s.arch.arch_id for s in samples)
        return super().update(samples, rewards)


class Lossy(Pool):
    """A pool whose evaluations can write their row and then be lost (``die_after_row``), be lost
    ``times`` times on ``worker`` (``sick``: every evaluation there), or run out of memory beside
    others (``oom``: ok when alone; ``oom_alone``: out of memory even alone, a failed row). Each
    evaluation names its worker: ``w<sample % workers>`` unless drained."""

    def __init__(self, run_dir, slots, *, die_after_row=(), lost=(), times=1, sick=None, workers=1, oom=(), oom_alone=(), **k):
        super().__init__(run_dir, slots, **k)
        self.die_after_row, self.lost, self.times, self.sick = set(die_after_row), set(lost), times, sick
        self.workers, self.oom, self.oom_alone = workers, set(oom), set(oom_alone)
        self.raised, self.drained, self.ran_on, self.alone = Counter(), [], Counter(), []

    def drain(self, worker):
        self.drained.append(worker)

    def evaluate(self, job):
        aid = job.arch.arch_id
        live = [f"w{i}" for i in range(self.workers) if f"w{i}" not in self.drained]
        worker = live[job.sample % len(live)]
        with self.lock:
            self.ran_on[worker] += 1
        if worker == self.sick or (aid in self.lost and self.raised[aid] < self.times):
            self.raised[aid] += 1
            raise EvaluationLost("RuntimeError: CUDA error: an illegal memory access was encountered", worker)
        if (aid in self.oom or aid in self.oom_alone) and not job.alone:
            raise EvaluationLost("OutOfMemoryError: CUDA out of memory", worker, "contention")
        if job.alone:
            self.alone.append(aid)
        if aid in self.oom_alone:
            self.fail.add(aid)  # alone too: the arch's own fault, a failed row
        rec = super().evaluate(job)
        if aid in self.die_after_row and self.raised[aid] == 0:
            self.raised[aid] += 1
            raise EvaluationLost("ConnectionError: worker lost after it wrote the row", worker)
        return {**rec, "worker": worker}


def _evaluations(run_dir) -> Counter:
    return Counter(line.split()[0] for line in (Path(run_dir) / "evaluations.log").read_text().splitlines())


def _check_exactly_once(run_dir, policy, summary, total):
    """No arch lost; none trained into two committed rows (the audit line follows each row a
    pool writes); no arch fed more often than it was drawn."""
    df = ResultsTable(run_dir).read()
    assert len(df) == summary.unique_archs == total
    assert max(_evaluations(run_dir).values()) == 1
    assert all(policy.fed[a] <= policy.drawn[a] for a in policy.fed) and sum(policy.fed.values()) == summary.issued
    return df


def test_resume_after_a_finished_archs_row_was_quarantined(tmp_path):
    """Fault 1: an arch finished (in the checkpoint's ``finished``, not yet fed to an update),
    then its part file was quarantined: every resume raised KeyError in the update."""
    cfg = SearchConfig(total_archs=8, archs_per_step=4)
    with pytest.raises(KeyboardInterrupt):
        run_async(tmp_path, RandomPolicy(seed=2), Pool(tmp_path, 2, crash_after=4), cfg, slots=2)  # the 5th submit follows a draw saved with 3 finished
    finished = loop_state(tmp_path / "c.pt")["finished"]
    assert finished, "the crash must leave finished archs not yet fed to an update"
    from nasfcos.arch import Arch

    gone = Arch.parse(finished[0]["draw"]["arch"]).arch_id
    table = ResultsTable(tmp_path)
    part = next(p for p in table._part_paths() if gone in set(table._read_file(p).column("arch_id").to_pylist()))
    (tmp_path / "quarantine").mkdir()
    shutil.move(part, tmp_path / "quarantine" / part.name)  # what the owner's compaction does with a damaged part
    policy = CountingPolicy(seed=2)
    summary = run_async(tmp_path, policy, Pool(tmp_path, 2), cfg, slots=2)
    df = ResultsTable(tmp_path).read()
    assert len(df) == summary.unique_archs == 8 and df.arch_id.is_unique and gone in set(df.arch_id)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_lost_evaluation_that_wrote_its_row_is_not_run_again(tmp_path, mode):
    """Fault 2: a worker that dies after writing its row (or a slow arch marked lost) made
    the loop evaluate the arch again and feed it twice; now the table is read first."""
    cfg = SearchConfig(total_archs=6, archs_per_step=2)
    dying = {s.arch.arch_id for s in RandomPolicy(seed=4).sample(3)}
    pool = Lossy(tmp_path, 2, die_after_row=dying)
    policy = CountingPolicy(seed=4)
    if mode == "async":
        summary = run_async(tmp_path, policy, pool, cfg, slots=2)
    else:
        with pool.executor:
            summary = run_search(policy=policy, evaluate=_sync(pool), results=ResultsTable(tmp_path), state_path=tmp_path / "c.pt", cfg=cfg)
    _check_exactly_once(tmp_path, policy, summary, 6)
    assert dying <= set(pool.raised) and max(_evaluations(tmp_path).values()) == 1  # trained once each


def _sync(pool):
    """A sync evaluator over the pool: the records of a step's jobs as they finish."""
    from nasfcos.search.rows import lost_record

    def evaluate(jobs):
        futures = {pool.executor.submit(pool.evaluate, j): j for j in jobs}
        for f in list(futures):
            try:
                yield f.result()
            except Exception as e:  # noqa: BLE001
                yield lost_record(futures[f].arch.arch_id, e)

    return evaluate


def test_an_arch_lost_every_time_gets_a_failed_row_naming_each_attempt(tmp_path):
    """Fault 3: a deterministic failure classed as infrastructure was resubmitted until every
    other arch was done (44 launches), then the breaker tripped on every resume."""
    bad = RandomPolicy(seed=6).sample(1)[0].arch.arch_id
    pool = Lossy(tmp_path, 2, lost={bad}, times=99)
    policy = CountingPolicy(seed=6)
    summary = run_async(tmp_path, policy, pool, SearchConfig(total_archs=6, archs_per_step=2, max_attempts=3), slots=2)
    df = _check_exactly_once(tmp_path, policy, summary, 6)
    row = df.set_index("arch_id").loc[bad]
    assert row.status == "failed" and row.reward_used == -10.0 and pool.raised[bad] == 3
    assert row.error.startswith("lost 3 times: [1] w0: RuntimeError: CUDA error") and "[3] " in row.error
    # the checkpoint holds the attempts of archs still without a row (a resume counts on); none is left
    assert loop_state(tmp_path / "c.pt")["attempts"] == {}


def test_a_sick_worker_is_drained_and_another_workers_success_never_resets_its_count(tmp_path):
    """Fault 3: the breaker was global and any success reset it, so a sick GPU failing fast
    never tripped it. Now a worker failing N in a row is drained, its archs go elsewhere."""
    pool = Lossy(tmp_path, 2, sick="w1", workers=2)
    policy = CountingPolicy(seed=8)
    summary = run_search_async_drain(tmp_path, policy, pool, SearchConfig(total_archs=10, archs_per_step=2, max_consecutive_failures=3), slots=2)
    _check_exactly_once(tmp_path, policy, summary, 10)
    assert pool.drained == ["w1"] and pool.ran_on["w1"] == 3  # drained after 3 in a row, never used again
    assert (ResultsTable(tmp_path).read().status == "ok").all()  # its archs finished on w0
    assert loop_state(tmp_path / "c.pt")["drained"] == ["w1"]
    with pytest.raises(SearchHalted, match=r"every worker is drained \(w0\); 2 evaluations in a row failed on w0"):  # no worker left: stop loudly
        run_search_async_drain(
            tmp_path / "all", CountingPolicy(seed=8), Lossy(tmp_path / "all", 2, sick="w0", workers=1), SearchConfig(total_archs=4, max_consecutive_failures=2), slots=1
        )
    # a resume (new processes, the machine fixed or not) starts with every worker in service
    pool = Lossy(tmp_path / "all", 1, workers=1)
    summary = run_search_async_drain(tmp_path / "all", CountingPolicy(seed=8), pool, SearchConfig(total_archs=4, max_consecutive_failures=2), slots=1)
    assert summary.unique_archs == 4 and summary.drained == ("w0",) and pool.ran_on["w0"] >= 4


def run_search_async_drain(run_dir, policy, pool, cfg, slots):
    from nasfcos.search.asynchronous import run_search_async

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with pool.executor:
        return run_search_async(policy=policy, submit=pool.submit, slots=slots, results=ResultsTable(run_dir), state_path=Path(run_dir) / "c.pt", cfg=cfg, drain=pool.drain)


def test_an_out_of_memory_beside_others_is_run_again_alone_before_the_arch_is_blamed(tmp_path):
    """Fault 4: ``device_shared`` came from the config, so an OOM caused by another tenant on a
    one-slot device was a permanent failed row, and an arch that OOMs even alone counted as
    infrastructure on a shared device (resubmitted for ever)."""
    a, b = (s.arch.arch_id for s in RandomPolicy(seed=10).sample(2))
    pool = Lossy(tmp_path, 2, oom={a}, oom_alone={b})
    policy = CountingPolicy(seed=10)
    summary = run_async(tmp_path, policy, pool, SearchConfig(total_archs=6, archs_per_step=2), slots=2)
    df = _check_exactly_once(tmp_path, policy, summary, 6).set_index("arch_id")
    assert df.loc[a].status == "ok" and df.loc[b].status == "failed" and sorted(pool.alone) == sorted([a, b])
    assert not pool.drained


def test_the_sync_wait_gives_up_on_a_hung_evaluation(tmp_path):
    """Fault 5: sync mode waited on ``as_completed`` with no timeout: one hung device call
    stalled the search for ever. Now the wait for the next result ends after
    ``execution.timeouts.search`` and the unfinished evaluations are lost."""
    from flows.dispatch import Dispatch
    from nasfcos.search.loop import Job

    jobs = [Job(s.arch, 0, i) for i, s in enumerate(RandomPolicy(seed=12).sample(3))]
    hung = jobs[1].arch.arch_id
    futures = {}

    def submit(job):
        f = futures[job.arch.arch_id] = Future()
        if job.arch.arch_id != hung:
            threading.Timer(0.05, f.set_result, [{**record(job.arch, token_reward(job.arch)), "worker": "w0"}]).start()
        return f

    d = Dispatch(lambda **_: {}, {}, lost_after_s=0.5)  # the dispatch's wait only
    d._submit = submit
    out, t0 = [], time.monotonic()
    worker = threading.Thread(target=lambda: out.extend(d.evaluate(jobs)), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the sync wait hung on the stuck evaluation"
    assert time.monotonic() - t0 < 5
    assert [r["status"] for r in out] == ["ok", "ok", "lost"] and out[-1]["arch_id"] == hung and "no result after 0.5 s" in out[-1]["error"]
