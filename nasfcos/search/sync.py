"""``search.mode: sync`` (``nasfcos.search.loop``'s docstring): K archs per step, all scored
before the update; bit-reproducible whatever order the evaluations finish in."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nasfcos.search.budget import Cost
from nasfcos.search.config import Evaluate, Job, Policy, Results, SearchConfig
from nasfcos.search.loop import SearchLoop, log
from nasfcos.search.sample import Sample
from nasfcos.search.state import SearchSummary


class SyncSearch(SearchLoop):
    """The sync schedule: :meth:`draw` a step's archs (``state.pending``, on disk before any
    is evaluated), :meth:`evaluate` those without a row, :meth:`update` on all of them."""

    def __init__(self, *, evaluate: Evaluate, **common) -> None:
        super().__init__(**common)
        if self.cfg.rungs:
            raise ValueError("successive halving (rungs) runs in the async loop only: its promotions are asynchronous (ASHA)")
        st = self.state
        if st.in_flight or st.finished or st.queued:
            raise ValueError(
                f"{self.state_path}: holds an async-mode search ({len(st.in_flight)} archs in flight, {len(st.queued)} queued, "
                f"{len(st.finished)} finished before the next update); resume it with search.mode=async"
            )
        self.evaluate_jobs = evaluate

    def draw(self) -> bool:
        """The next step's samples into ``state.pending``, checkpointed; False when the search is done."""
        st, cfg = self.state, self.cfg
        remaining = cfg.total_archs - len(self.known)
        if remaining <= 0:
            return False
        if st.issued >= self.max_samples:
            log.warning("stopping: %d samples issued but only %d unique archs (max_samples reached)", st.issued, len(self.known))
            return False
        samples, _ = self.budget.draw(self.policy, min(cfg.archs_per_step, remaining), step=st.step, first_sample=0)
        st.pending = [s.to_dict() for s in samples]
        self.checkpoint()  # issued archs are durable before any is trained
        return True

    def evaluate(self, samples: list[Sample]) -> None:
        """Every pending arch without a row gets one; lost evaluations are evaluated again
        (the failure budgets bound it)."""
        todo: dict[str, Job] = {}
        for i, s in enumerate(samples):
            if s.arch.arch_id not in self.known and s.arch.arch_id not in todo:
                todo[s.arch.arch_id] = Job(s.arch, self.state.step, i)
        while todo:
            answered = set()
            for record in self.evaluate_jobs(list(todo.values())):
                aid = record["arch_id"]
                answered.add(aid)
                outcome = self.settle(todo[aid], record, append=True, busy=None)
                if outcome == "alone" or outcome == "again":
                    todo[aid] = Job(todo[aid].arch, todo[aid].step, todo[aid].sample, alone=outcome == "alone" or todo[aid].alone)
                else:
                    del todo[aid]
                    self.evaluated_now += 1
            self.failures.check(busy=0)
            silent = [a for a in todo if a not in answered]  # neither a row nor a lost record: a broken evaluator
            if silent:
                raise RuntimeError(f"evaluator returned no record for {len(silent)} archs, e.g. {silent[0]}")

    def update(self, samples: list[Sample]) -> None:
        """The step's update on all its samples, the compaction and the checkpoint."""
        st = self.state
        st.issued += len(samples)
        st.pending = None
        # archs this step added, counted from their rows: the same after a resume mid-step
        added = len({s.arch.arch_id for s in samples if self.known[s.arch.arch_id].get("step") == st.step})
        info = self.learn(samples, evaluated=added)
        self.results.compact()
        self.checkpoint()
        log.info(
            "step %d: %d/%d archs, step mean reward %.4f, best %.4f",
            st.step, len(self.known), self.cfg.total_archs, info["mean_reward"], info["best_reward"],
        )  # fmt: skip
        if self.on_step is not None:
            self.on_step(info)

    def run(self) -> SearchSummary:
        st = self.state
        if st.step or st.pending:
            log.info("resuming search at step %d (%d archs issued, %d in results)", st.step, st.issued, len(self.known))
        while st.pending is not None or self.draw():
            samples = [Sample.from_dict(d) for d in st.pending]
            self.evaluate(samples)
            self.update(samples)
        return self.summary()


def run_search(
    *,
    evaluate: Evaluate,
    policy: Policy,
    results: Results,
    state_path: str | Path,
    cfg: SearchConfig = SearchConfig(),
    on_step: Callable[[dict], None] | None = None,
    cost: Cost | None = None,
    drain: Callable[[str], None] | None = None,
    fence: Callable[[], None] | None = None,
) -> SearchSummary:
    """Run (or resume) the search until ``cfg.total_archs`` unique archs are in ``results``.

    ``evaluate(jobs)`` yields one record per job (fields of
    ``nasfcos.engine.proxy.evaluate_arch``), in any order, as they finish; each is
    appended immediately, so a crash loses no finished evaluation. An evaluator running
    elsewhere should also append its row itself (``nasfcos.search.rows.make_row``) before
    returning, which closes the window between finishing and the loop's append; appending
    twice is harmless (the table keeps one row per arch). The other arguments are
    :class:`nasfcos.search.loop.SearchLoop`'s: ``on_step`` receives a small dict after every
    step (progress reporting); ``cost`` prices an arch for the cost constraint;
    ``drain(worker)`` takes a worker out of service when the failure budget drains it
    (``nasfcos.search.failures.Failures``); ``fence()`` raises when this search's flow no
    longer owns the run (a newer run epoch, ``storage.run_epoch``): called before every
    checkpoint write and every re-dispatch, so a superseded flow stops instead of
    overwriting the new owner's checkpoint.

    Exactly once: a lost evaluation's arch is evaluated again only when the table has no
    row for it (the evaluation may have written its row, then died); its reward feeds the
    update once, from its row.
    """
    return SyncSearch(evaluate=evaluate, policy=policy, results=results, state_path=state_path, cfg=cfg, on_step=on_step, cost=cost, drain=drain, fence=fence).run()
