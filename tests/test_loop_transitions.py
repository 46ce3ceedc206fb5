"""The search loop's transitions, one at a time (issue #27): the async schedule's
``submit_next`` / ``receive`` / ``update`` / ``resume`` / ``promote``, the in-flight table and
the sync schedule's ``draw`` / ``evaluate`` / ``update``, each driven by hand against
futures the test resolves, with what the checkpoint on disk says after each."""

from concurrent.futures import Future

import pytest
from helpers import record, token_reward

from nasfcos.errors import EvaluationLost
from nasfcos.search.asynchronous import AsyncSearch, InFlight
from nasfcos.search.loop import SearchConfig
from nasfcos.search.policies import RandomPolicy
from nasfcos.search.state import load_state
from nasfcos.search.sync import SyncSearch
from storage.results import ResultsTable


class Hand:
    """A submit whose futures the test resolves: ``jobs`` in submission order."""

    def __init__(self) -> None:
        self.jobs, self.futures = [], []

    def __call__(self, job):
        f = Future()
        self.jobs.append(job)
        self.futures.append(f)
        return f

    def finish(self, i: int, *, worker: str = "w0") -> None:
        a = self.jobs[i].arch
        self.futures[i].set_result({**record(a, token_reward(a)), "worker": worker})

    def lose(self, i: int, *, worker: str = "w0") -> None:
        self.futures[i].set_exception(EvaluationLost("CUDA error: launch failure", worker, "infrastructure"))


class Learner(RandomPolicy):
    """A random policy that records each update's arch ids."""

    def __init__(self) -> None:
        super().__init__(seed=3)
        self.updates = []

    def update(self, samples, rewards):
        self.updates.append([s.arch.arch_id for s in samples])
        return {}


def _search(tmp_path, hand, *, slots=2, policy=None, **cfg) -> AsyncSearch:
    settings = {"total_archs": 4, "archs_per_step": 2, **cfg}
    return AsyncSearch(submit=hand, slots=slots, policy=policy or Learner(), results=ResultsTable(tmp_path), state_path=tmp_path / "c.pt", cfg=SearchConfig(**settings))


def _on_disk(tmp_path):
    return load_state(tmp_path / "c.pt", RandomPolicy(seed=0))


def test_submit_next_checkpoints_the_draw_before_submitting(tmp_path):
    hand = Hand()
    s = _search(tmp_path, hand)
    assert s.next_transition() == s.submit_next
    s.submit_next()
    disk = _on_disk(tmp_path)  # written by the draw, before the first submission
    assert len(disk.queued) == 2 and disk.in_flight == [] and len(hand.jobs) == 1
    assert hand.jobs[0].arch.arch_id == s.arch_id(disk.queued[0])
    s.submit_next()  # the second slot: from the queue, no new draw
    assert len(hand.jobs) == 2 and s.state.queued == [] and s.state.issued == 2
    assert s.next_transition() == s.receive  # both slots busy: wait for a result


def test_receive_settles_a_result_and_update_learns_in_finish_order(tmp_path):
    hand, policy = Hand(), Learner()
    s = _search(tmp_path, hand, policy=policy)
    s.submit_next()
    s.submit_next()
    hand.finish(1)
    hand.finish(0)
    s.receive()
    s.receive()
    ids = [j.arch.arch_id for j in hand.jobs]
    assert [s.arch_id(e) for e in s.state.finished] == [ids[1], ids[0]] and set(ids) <= set(s.known)
    assert s.next_transition().func == s.update  # K=2 finished
    s.next_transition()()
    assert policy.updates == [[ids[1], ids[0]]] and s.state.step == 1 and s.state.finished == []
    assert len(s.state.queued) == 2  # the new policy's batch, drawn in the update's checkpoint
    assert len(_on_disk(tmp_path).queued) == 2


def test_a_lost_evaluation_is_submitted_again_then_blamed(tmp_path):
    hand = Hand()
    s = _search(tmp_path, hand, slots=1, max_attempts=2, max_consecutive_failures=5)
    s.submit_next()
    hand.lose(0)
    s.receive()  # attempt 1: the same job again
    assert len(hand.jobs) == 2 and hand.jobs[1] == hand.jobs[0] and list(s.state.attempts.values()) == [["w0: CUDA error: launch failure"]]
    hand.lose(1)
    s.receive()  # attempt 2 of 2: a failed row naming both
    aid = hand.jobs[0].arch.arch_id
    row = ResultsTable(tmp_path).get(aid)
    assert row["status"] == "failed" and row["error"].startswith("lost 2 times: [1] w0: CUDA error") and aid not in s.state.attempts


def test_in_flight_table_counts_a_silent_evaluation_lost(tmp_path):
    hand = Hand()
    flight = InFlight(hand, lost_after_s=0.2)
    s = _search(tmp_path, hand)
    job = s.budget.draw(s.policy, 1, step=0, first_sample=0)[0][0]
    from nasfcos.search.loop import Job

    flight.launch(Job(job.arch, 0, 0))
    got, rec = flight.next_done()
    assert got.arch == job.arch and rec["status"] == "lost" and "no result after 0 s" in rec["error"] and len(flight) == 0
    hand.finish(0)  # the late result of the lost evaluation is ignored by the next wait


def test_resume_feeds_archs_with_a_row_and_submits_the_others_again(tmp_path):
    hand = Hand()
    s = _search(tmp_path, hand)
    s.submit_next()
    s.submit_next()
    s.checkpoint()  # both in flight on disk
    first = hand.jobs[0]
    ResultsTable(tmp_path).append([_row(first)])  # the evaluator wrote its row; the loop died before it learnt of it
    again = Hand()
    r = _search(tmp_path, again)
    r.resume()
    assert [r.arch_id(e) for e in r.state.finished] == [first.arch.arch_id] and len(r.state.in_flight) == 1
    assert [j for j in again.jobs] == [hand.jobs[1]]  # only the one without a row, as the same job


def _row(job):
    from nasfcos.search.rows import make_row

    return make_row(record(job.arch, token_reward(job.arch)), step=job.step, sample=job.sample, penalty=-10.0)


def test_the_search_ends_when_nothing_is_left(tmp_path):
    hand = Hand()
    s = _search(tmp_path, hand, total_archs=2, slots=2)
    s.submit_next()
    s.submit_next()
    assert s.next_transition() == s.receive  # total reached in flight: nothing more to draw
    hand.finish(0)
    hand.finish(1)
    s.receive()
    s.receive()
    s.next_transition()()  # the update on the 2 finished
    assert s.next_transition() is None and s.state.step == 1


def test_sync_transitions_draw_evaluate_update(tmp_path):
    policy = Learner()
    seen = []

    def evaluate(jobs):
        seen.append([j.arch.arch_id for j in jobs])
        for j in reversed(jobs):  # any finishing order
            yield {**record(j.arch, token_reward(j.arch)), "worker": "w0"}

    s = SyncSearch(evaluate=evaluate, policy=policy, results=ResultsTable(tmp_path), state_path=tmp_path / "c.pt", cfg=SearchConfig(total_archs=2, archs_per_step=2))
    assert s.draw() and len(_on_disk(tmp_path).pending) == 2  # on disk before any is evaluated
    from nasfcos.search.sample import Sample

    samples = [Sample.from_dict(d) for d in s.state.pending]
    s.evaluate(samples)
    assert len(seen) == 1 and set(seen[0]) <= set(s.known)
    s.update(samples)
    assert policy.updates == [[x.arch.arch_id for x in samples]]  # sample order, not finish order: reproducible
    assert s.state.pending is None and not s.draw()


def test_async_refuses_a_pending_sync_step(tmp_path):
    s = SyncSearch(
        evaluate=lambda jobs: iter(()), policy=Learner(), results=ResultsTable(tmp_path), state_path=tmp_path / "c.pt", cfg=SearchConfig(total_archs=2, archs_per_step=2)
    )
    s.draw()
    with pytest.raises(ValueError, match="sync-mode step is pending"):
        _search(tmp_path, Hand())


def test_a_checkpoint_of_the_old_format_resumes(tmp_path):
    """Checkpoints before 2026-12-04 pickled the loop state's fields beside the policy; the
    loop state is one JSON text now (torch.save's per-element hook cost 10 ms per arch)."""
    import dataclasses

    import torch

    _search(tmp_path, Hand()).submit_next()
    new = _on_disk(tmp_path)
    torch.save({"policy": RandomPolicy(seed=0).state_dict(), **dataclasses.asdict(new)}, tmp_path / "old.pt")
    assert load_state(tmp_path / "old.pt", RandomPolicy(seed=0)) == new and new.queued
