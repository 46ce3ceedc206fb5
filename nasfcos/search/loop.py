"""The search loop (NAS-FCOS §3.3): sample decoders, score them on the proxy task,
update the controller; resumable at any point. Plain Python: the Prefect flow
injects how evaluations run (``flows/dispatch.py``). Two schedules, each an object
whose transitions are methods (:class:`SearchLoop` holds what they share: the durable
state, the rows known, the failure and cost budgets, and :meth:`SearchLoop.settle`,
which turns an evaluation's record into its row or sends the arch back):

:func:`nasfcos.search.sync.run_search` (``search.mode: sync``, bit-reproducible). Per step: sample K
archs (recorded in the controller checkpoint *before* any is evaluated),
evaluate those not yet in the results table, append each record as it arrives,
update the policy with the rewards of all K (stored rewards for archs seen
before; ``failure_penalty`` for failed ones), compact the table and checkpoint
the controller. A search killed anywhere resumes from the last
checkpoint: the pending archs are the same, finished ones are not evaluated
again, and the update is redone from the same state.

:func:`nasfcos.search.asynchronous.run_search_async` (``search.mode: async``): ``slots`` evaluations stay in
flight; each freed slot gets a sampled arch at once, so no slot idles while the
slowest arch of a step finishes. Archs are drawn ``archs_per_step`` (or as many
as there are free slots) at a time from the current policy and queued; the
queue is dropped at each update, so no submission is more than one update
stale. The controller updates on every ``archs_per_step`` finished results, in
the order they finish; an arch may have been sampled by a policy a few updates
older than the one it updates. PPO's ratio against the stored sampling
log-probability corrects for that only inside its clip band: past it the sample's
gradient is zeroed, so at 64 slots plain PPO closes ~0.4x the gap a 1-slot search
closes with as many archs (``benchmarks/staleness.py``; the controller's
``stale_correction="decoupled"`` brings it to ~0.75). ``results.parquet`` is compacted at most every
:data:`COMPACT_EVERY_S` (readers of ``ResultsTable`` see every row at once). The
checkpoint, written after each draw and each update, lists the queued draws,
the in-flight samples and the finished ones not yet used by an update, so every
submitted arch is on disk before it is submitted; a killed search resubmits
exactly the archs without a row and evaluates none twice. Drawing in batches keeps the flow's thread free: one
LSTM pass and one checkpoint per batch instead of per arch. Which archs are
sampled depends on the order evaluations finish, so only ``slots=1`` is
reproducible.

**Cost constraint** (MnasNet-style hard constraint, beyond the paper): with
``max_decoder_params`` / ``max_decoder_macs`` set, every sampled arch is costed
(``cost``, e.g. ``nasfcos.model.complexity.decoder_cost`` at the proxy geometry) as it is
drawn; one above a limit is written once as an ``over_budget`` row (the reason in
``error``; ``reward_used`` holds the failure penalty for the schema, but nothing feeds
it to the policy) and another arch is drawn in its place, so it never reaches the
evaluator. Over-budget archs are not evaluated archs: they do not count towards
``total_archs`` or ``max_samples``, take no slot and feed no update (the policy sees
only the archs it is scored on: rejection sampling from the policy restricted to the
budget); a known over-budget arch drawn again is rejected without a new row.
``state.rejected`` counts every rejected draw. Rejected draws take the sample indices
after the accepted ones of the same draw.

**Successive halving** (``rungs``, async mode only; ``nasfcos.search.halving``, beyond the
paper): a new arch is evaluated at the first rung's epochs; whenever a slot frees,
an arch in the top 1/``eta`` of its rung that has not gone on is promoted (trained on to
the next rung from its saved state) before any new arch is drawn. A promotion is in the
checkpoint (``in_flight``, with its ``rung``) before it is submitted, and its row, that
of the higher rung with the rewards of the rungs below (``rung_epochs``,
``rung_rewards``), replaces the arch's lower one in ``results.parquet`` (one row per
arch, its highest fidelity; ``reward_used`` that fidelity's reward). ``total_archs``
counts archs, not evaluations; promotions go on after the last arch is drawn until none
is left. The policy learns from an arch when its first rung ends, with ``reward_used``
then (the first rung's reward; a known arch drawn again feeds its current
``reward_used``, which may be of a higher rung): every fresh sample is judged at one
fidelity, so PPO's baseline and evolution's tournaments compare like with like.
Selection (the summary's best arch, ``ResultsTable.top_k``) ranks archs that reached
more rungs first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import atomicio
from nasfcos.search.budget import Cost, CostBudget
from nasfcos.search.config import Evaluate, Future, Job, Policy, Results, SearchConfig, Submit  # noqa: F401 - the loop's vocabulary, importable here
from nasfcos.search.failures import Failures, SearchHalted  # noqa: F401 - SearchHalted: the loop's error, importable here
from nasfcos.search.rows import attempts_row, make_row, reward_of, rungs_reached, worker_of
from nasfcos.search.sample import Sample
from nasfcos.search.state import SearchState, SearchSummary, checkpointer, known_rows, load_state, step_info, summary

log = logging.getLogger(__name__)


class SearchLoop:
    """What both schedules share: the controller checkpoint's state (restored from
    ``state_path``), the rows known (arch id -> its row), the cost budget, the failure
    budgets, and the transitions that use them (:meth:`settle`, :meth:`learn`)."""

    def __init__(
        self, *, policy: Policy, results: Results, state_path: str | Path, cfg: SearchConfig = SearchConfig(),
        on_step: Callable[[dict], None] | None = None, cost: Cost | None = None, drain: Callable[[str], None] | None = None,
        fence: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.policy, self.results, self.cfg, self.on_step, self.fence = policy, results, cfg, on_step, fence
        self.state_path = Path(state_path)
        atomicio.remove_orphans(self.state_path.parent, name=self.state_path.name, older_than=0)  # this search is its one writer
        self.state: SearchState = load_state(self.state_path, policy)
        self.known, over = known_rows(results)
        self.budget = CostBudget(cfg, cost, results, over, self.state)
        self.checkpoint = checkpointer(self.state_path, policy, self.state, cfg, fence)
        self.failures = Failures(cfg.max_consecutive_failures, cfg.max_attempts, self.state, drain, on_halt=self.checkpoint)
        self.max_samples = cfg.max_samples or 4 * cfg.total_archs
        self.evaluated_now = 0  # archs evaluated by this process (first rung under successive halving)

    def settle(self, job: Job, record: dict, *, append: bool, busy: int | None) -> dict | str:
        """One evaluation's record -> the arch's row, now in :attr:`known` (its evaluation is
        over), or ``"again"`` / ``"alone"``: evaluate it again (alone: it ran out of memory
        beside others).

        A lost record (``status: lost``) is first checked against the table: the evaluation
        may have written its row, then died, and that row stands (exactly once). Otherwise it
        counts against the failure budgets, and an arch lost ``max_attempts`` times gets a
        ``failed`` row naming every attempt. ``append``: write the row (the evaluator did not);
        ``busy``: evaluations still in flight, for the circuit breaker (None: the caller checks).
        """
        aid, cfg, worker = job.arch.arch_id, self.cfg, worker_of(record)
        fidelity = {"rungs": cfg.rungs[: job.rung + 1], "history": job.history} if cfg.rungs else {}
        if record["status"] == "lost":
            if self.fence is not None:
                self.fence()  # a task stopped by a newer owner's epoch: this flow is superseded too
            row = self.results.get(aid)
            if row is not None and rungs_reached(row) > job.rung:
                log.info("arch %s: lost after it wrote its row; the row stands, no second evaluation", aid)
            elif record.get("alone"):
                log.warning("arch %s ran out of memory beside other evaluations on %s; evaluating it again alone", aid, worker or "its device")
                return "alone"
            elif not self.failures.failed(aid, record["error"], worker=worker, lost=True):
                if busy is not None:
                    self.failures.check(busy=busy)
                return "again"
            else:
                row = attempts_row(job.arch, self.state.attempts[aid], step=job.step, sample=job.sample, penalty=cfg.failure_penalty)
                if fidelity:
                    row.update(epochs=cfg.rungs[job.rung], rung_epochs=list(fidelity["rungs"]), rung_rewards=[*job.history, float("nan")])
                self.results.append([row])
        else:
            row = make_row(record, step=job.step, sample=job.sample, penalty=cfg.failure_penalty, **fidelity)
            if append:
                self.results.append([row])
            if row["status"] == "ok":
                self.failures.ok(worker)
            else:
                self.failures.failed(aid, row["error"], worker=worker, lost=False)
                if busy is not None:
                    self.failures.check(busy=busy)
        self.known[aid] = row
        self.state.attempts.pop(aid, None)
        log.info("arch %s: %s, reward %.4f, %.1f s on %s", aid, row["status"], row["reward"], row["train_seconds"], worker or "?")  # one line per evaluation
        return row

    def learn(self, samples: list[Sample], *, evaluated: int, **extra) -> dict:
        """The policy update on ``samples`` (each with its row's reward; the penalty when it
        failed): the step's progress record, appended to the state's stats."""
        rewards = [reward_of(self.known[s.arch.arch_id], self.cfg.failure_penalty) for s in samples]
        stats = self.policy.update(samples, rewards)
        self.state.step += 1
        info = {**step_info(self.state, self.known, self.cfg, rewards, evaluated, stats), **extra}
        self.state.stats.append(info)
        return info

    def summary(self) -> SearchSummary:
        return summary(self.state, self.known, self.evaluated_now)
