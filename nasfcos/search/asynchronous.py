"""``search.mode: async`` (``nasfcos.search.loop``'s docstring): ``slots`` evaluations in
flight, an update every K results in the order they finish, successive halving's promotions
between them."""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from nasfcos.arch import Arch
from nasfcos.search.budget import Cost
from nasfcos.search.config import Future, Job, Policy, Results, SearchConfig, Submit
from nasfcos.search.halving import Ladder
from nasfcos.search.loop import SearchLoop, log
from nasfcos.search.rows import lost_record, rungs_reached
from nasfcos.search.sample import Sample
from nasfcos.search.state import SearchSummary

# results.parquet is compacted at most this often (and at the end): at 64 slots a
# compaction per update would cost the flow's thread more than the controller does.
COMPACT_EVERY_S = 10.0


class InFlight:
    """The evaluations in flight, one per arch id: its job, its future and when it was
    submitted. Done callbacks (any thread) only put the arch id on a queue; everything else
    runs in the loop's thread. Callbacks rather than ``wait(..., FIRST_COMPLETED)``:
    ``concurrent.futures.wait`` takes only its own futures, while ``add_done_callback`` is
    what concurrent, Dask and Prefect futures share."""

    def __init__(self, submit: Submit, lost_after_s: float | None) -> None:
        self.submit, self.lost_after_s = submit, lost_after_s
        self.done: queue.SimpleQueue[tuple[str, Future]] = queue.SimpleQueue()
        self.running: dict[str, tuple[Job, Future, float]] = {}

    def __len__(self) -> int:
        return len(self.running)

    def __contains__(self, arch_id: str) -> bool:
        return arch_id in self.running

    def launch(self, job: Job) -> None:
        aid = job.arch.arch_id
        future = self.submit(job)
        self.running[aid] = (job, future, time.monotonic())
        future.add_done_callback(lambda f, aid=aid: self.done.put((aid, f)))

    def next_done(self) -> tuple[Job, dict]:
        """The next finished evaluation's job and record; one that raised, or has run past
        ``lost_after_s`` since it was submitted (a call hung in the device, say), gives a
        ``lost`` record."""
        while True:
            wait = None if self.lost_after_s is None else max(0.0, min(t for _, _, t in self.running.values()) + self.lost_after_s - time.monotonic())
            try:
                aid, future = self.done.get(timeout=wait)
            except queue.Empty:
                aid = min(self.running, key=lambda a: self.running[a][2])
                job, _, _ = self.running.pop(aid)
                return job, lost_record(aid, TimeoutError(f"no result after {self.lost_after_s:.0f} s"))
            if aid not in self.running or self.running[aid][1] is not future:
                continue  # a lost evaluation that ended after all: its arch was resubmitted
            job, _, _ = self.running.pop(aid)
            try:
                record = future.result()
            except Exception as e:  # noqa: BLE001 - an infrastructure failure after the evaluator's own handling
                return job, lost_record(aid, e)
            if record["arch_id"] != aid:
                raise RuntimeError(f"evaluation of {aid} returned the record of {record['arch_id']}")
            return job, record


class AsyncSearch(SearchLoop):
    """The async schedule as transitions on the checkpointed state (``state.queued``,
    ``in_flight``, ``finished``) and the :class:`InFlight` table. :meth:`next_transition`
    picks the one that applies; each is a method a test can call alone: :meth:`resume`,
    :meth:`draw`, :meth:`submit_next`, :meth:`promote`, :meth:`receive`, :meth:`update`."""

    def __init__(self, *, submit: Submit, slots: int, evaluator_writes_rows: bool = False, **common) -> None:
        if slots < 1:
            raise ValueError(f"slots: need at least 1 evaluation in flight, got {slots}")
        super().__init__(**common)
        if self.state.pending is not None:
            raise ValueError(f"{self.state_path}: a sync-mode step is pending; finish it with search.mode=sync first")
        self.slots, self.writes_rows = slots, evaluator_writes_rows
        self.flight = InFlight(submit, self.cfg.lost_after_s)
        self.ladder = Ladder(self.cfg.rungs, self.cfg.eta) if self.cfg.rungs else None
        self.ids: dict[str, str] = {}  # arch string -> id: looked up for every entry in flight per result
        self.evaluated_since_update = self.promoted_now = 0
        self.compacted = time.monotonic()  # the last compaction

    # -- helpers -------------------------------------------------------------------------
    def arch_id(self, entry: dict) -> str:
        text = entry["draw"]["arch"]
        if text not in self.ids:
            self.ids[text] = Arch.parse(text).arch_id
        return self.ids[text]

    def launch(self, entry: dict, alone: bool = False) -> None:
        """Submit an entry's evaluation, unless its arch is in flight already (it waits for that one)."""
        aid = self.arch_id(entry)
        if aid not in self.flight:
            rung, fidelity = entry.get("rung", 0), {}
            if self.ladder is not None:
                fidelity = {"rung": rung, "epochs": self.cfg.rungs[rung], "history": tuple(self.known[aid]["rung_rewards"][:rung]) if rung else ()}
            self.flight.launch(Job(Arch.parse(entry["draw"]["arch"]), entry["step"], entry["sample"], alone=alone, **fidelity))

    def new_in_flight(self) -> int:
        """Archs in flight for their first evaluation (the others are promotions)."""
        return len(self.flight) if self.ladder is None else sum(1 for a in self.flight.running if a not in self.known)

    def can_draw(self) -> bool:
        return len(self.known) + self.new_in_flight() < self.cfg.total_archs and self.state.issued < self.max_samples

    def has_row(self, entry: dict) -> bool:
        """Whether the evaluation of an in-flight entry (at its rung) has its row."""
        aid = self.arch_id(entry)
        return aid in self.known and rungs_reached(self.known[aid]) > entry.get("rung", 0)

    # -- transitions ---------------------------------------------------------------------
    def resume(self) -> None:
        """Reconcile the checkpoint with the rows, then submit what was in flight: an
        in-flight arch with a row finished (rows are durable before the loop learns of
        them), in the order its row finished; a finished one whose row is gone (a damaged
        file quarantined since) is evaluated again."""
        st = self.state
        if st.step or st.in_flight or st.finished or st.queued:
            log.info(
                "resuming async search at step %d (%d archs issued, %d in flight, %d queued, %d in results)",
                st.step, st.issued, len(st.in_flight), len(st.queued), len(self.known),
            )  # fmt: skip
        gone = [e for e in st.finished if self.arch_id(e) not in self.known]
        if gone:
            log.warning("%d finished archs have no row any more (quarantined?); evaluating them again, e.g. %s", len(gone), self.arch_id(gone[0]))
            st.finished = [e for e in st.finished if self.arch_id(e) in self.known]
            st.in_flight += gone
        landed = sorted((e for e in st.in_flight if self.has_row(e)), key=lambda e: self.known[self.arch_id(e)]["finished_at"])
        st.in_flight = [e for e in st.in_flight if not self.has_row(e)]
        st.finished += [e for e in landed if e.get("rung", 0) == 0]  # a promotion fed the policy when its first rung ended
        if self.ladder is not None:
            for aid, row in self.known.items():
                self.ladder.finished(aid, row["rung_rewards"])
            for entry in st.in_flight:
                if entry.get("rung", 0):
                    self.ladder.start(self.arch_id(entry), entry["rung"])
        for entry in st.in_flight:
            self.launch(entry)

    def next_transition(self) -> Callable[[], None] | None:
        """The transition that applies now (None: the search is over)."""
        st, free = self.state, len(self.flight) < self.slots
        if len(st.finished) >= self.cfg.archs_per_step:
            return partial(self.update, self.cfg.archs_per_step)
        if free and self.ladder is not None and (promotion := self.ladder.promotion()) is not None:
            return partial(self.promote, *promotion)
        if free and (st.queued or self.can_draw()):
            return self.submit_next
        if len(self.flight):
            return self.receive
        if st.finished:  # nothing left to sample or wait for: learn from the rest
            return partial(self.update, len(st.finished))
        return None

    def draw(self) -> None:
        """Queue K archs (or one per free slot) from the current policy; the caller saves."""
        st, cfg = self.state, self.cfg
        n = min(max(cfg.archs_per_step, self.slots - len(self.flight)), cfg.total_archs - len(self.known) - self.new_in_flight(), self.max_samples - st.issued)
        samples, rejected = self.budget.draw(self.policy, n, step=st.step, first_sample=st.drawn)
        st.queued = [{"step": st.step, "sample": st.drawn + i, "draw": s.to_dict()} for i, s in enumerate(samples)]
        st.drawn += n + rejected

    def submit_next(self) -> None:
        """The next queued arch into a free slot (drawing a batch first when none is queued):
        a known arch feeds its stored reward, one in flight waits for that evaluation."""
        st = self.state
        if not st.queued:
            self.draw()
            self.checkpoint()  # on disk before any of them is submitted
        entry = st.queued.pop(0)
        st.issued += 1  # a sample counts once it enters the search, not when drawn (an update drops the rest)
        if self.arch_id(entry) in self.known:
            st.finished.append(entry)
        else:
            st.in_flight.append(entry)
            self.launch(entry)

    def promote(self, aid: str, rung: int) -> None:
        """Successive halving: an arch trained on to ``rung``; in the checkpoint before it is submitted."""
        row = self.known[aid]  # its row keeps where it was sampled; the entry has no draw to learn from
        entry = {"step": int(row["step"]), "sample": int(row["sample"]), "draw": {"arch": row["arch"]}, "rung": rung}
        self.ladder.start(aid, rung)
        self.state.in_flight.append(entry)
        self.checkpoint()
        self.launch(entry)

    def receive(self) -> None:
        """Wait for the next finished evaluation and settle it: its row known, its entries
        finished (or its arch submitted again)."""
        st = self.state
        job, record = self.flight.next_done()
        aid = job.arch.arch_id
        outcome = self.settle(job, record, append=not self.writes_rows, busy=len(self.flight))
        if isinstance(outcome, str):
            self.flight.launch(dataclasses.replace(job, alone=outcome == "alone"))  # the same job again
            return
        mine = [e for e in st.in_flight if self.arch_id(e) == aid]  # one rung: a promotion waits for its lower rung's row
        st.in_flight = [e for e in st.in_flight if self.arch_id(e) != aid]
        if self.ladder is not None:
            self.ladder.finished(aid, outcome["rung_rewards"])
        if job.rung:
            self.promoted_now += 1
        else:
            self.evaluated_now += 1
            self.evaluated_since_update += 1
            st.finished += mine

    def update(self, n: int) -> None:
        """The policy learns from the first ``n`` finished samples; the queue drawn by the old
        policy is dropped and the new one's first batch drawn, in the same checkpoint."""
        st = self.state
        batch, st.finished = st.finished[:n], st.finished[n:]
        st.queued = []  # drawn by the policy this update replaces, never submitted: dropped
        stale = sum(st.step - e["step"] for e in batch) / len(batch)  # updates between sampling and learning
        info = self.learn([Sample.from_dict(e["draw"]) for e in batch], evaluated=self.evaluated_since_update, in_flight=len(self.flight), staleness=stale)
        st.drawn = 0
        self.evaluated_since_update = 0
        if time.monotonic() - self.compacted >= COMPACT_EVERY_S:
            self.results.compact()
            self.compacted = time.monotonic()
        if self.can_draw():
            self.draw()  # the new policy's next archs, in the same checkpoint
        self.checkpoint()
        log.info(
            "step %d: %d/%d archs, %d in flight, step mean reward %.4f, best %.4f",
            st.step, len(self.known), self.cfg.total_archs, len(self.flight), info["mean_reward"], info["best_reward"],
        )  # fmt: skip
        if self.on_step is not None:
            self.on_step(info)

    def run(self) -> SearchSummary:
        self.resume()
        while (transition := self.next_transition()) is not None:
            transition()
        if len(self.known) < self.cfg.total_archs:
            log.warning("stopping: %d samples issued but only %d unique archs (max_samples reached)", self.state.issued, len(self.known))
        self.results.compact()
        self.checkpoint()
        return dataclasses.replace(self.summary(), promoted_now=self.promoted_now)


def run_search_async(
    *,
    submit: Submit,
    slots: int,
    policy: Policy,
    results: Results,
    state_path: str | Path,
    cfg: SearchConfig = SearchConfig(),
    on_step: Callable[[dict], None] | None = None,
    cost: Cost | None = None,
    drain: Callable[[str], None] | None = None,
    fence: Callable[[], None] | None = None,
    evaluator_writes_rows: bool = False,
) -> SearchSummary:
    """Run (or resume) the search with ``slots`` evaluations in flight until
    ``cfg.total_archs`` unique archs are in ``results`` (``nasfcos.search.loop``'s docstring).

    ``submit(job)`` starts one evaluation and returns a ``nasfcos.search.loop.Future`` whose
    result is its record (as ``evaluate`` yields in ``run_search``; the evaluator should
    append its own row too). ``evaluator_writes_rows``: the evaluation wrote its row
    durably before its future resolved, so the loop does not append it again (at 64 slots
    that append was a fifth of the loop thread's time per arch). The other arguments are
    :class:`nasfcos.search.loop.SearchLoop`'s; a lost arch is evaluated again only when the
    table has no row for it, and each evaluated arch feeds one update once.

    The checkpoint is written after every draw, before any of the drawn archs is
    submitted, so a submitted arch is always in ``queued`` or ``in_flight`` on disk; on
    resume, in-flight archs with a row count as finished (in the order their rows
    finished) and the others are resubmitted as the same job (same arch, step and sample
    index); queued ones go on in draw order, those with a row feeding their stored reward.
    An arch sampled again is not evaluated again: a known one feeds its stored reward at
    once, one still in flight waits for that evaluation. When nothing is left to sample or
    in flight, the last update uses the fewer than K left over.
    """
    return AsyncSearch(
        submit=submit,
        slots=slots,
        evaluator_writes_rows=evaluator_writes_rows,
        policy=policy,
        results=results,
        state_path=state_path,
        cfg=cfg,
        on_step=on_step,
        cost=cost,
        drain=drain,
        fence=fence,
    ).run()
