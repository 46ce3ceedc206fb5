"""The search loop (NAS-FCOS §3.3): sample decoders, score them on the proxy task,
update the controller; resumable at any point. Plain Python: the Prefect flow
injects how evaluations run (parallel tasks). Two schedules share the state,
the checkpoint and the rows:

:func:`run_search` (``search.mode: sync``, bit-reproducible). Per step: sample K
archs (recorded in the controller checkpoint *before* any is evaluated),
evaluate those not yet in the results table, append each record as it arrives,
update the policy with the rewards of all K (stored rewards for archs seen
before; ``failure_penalty`` for failed ones), compact the table and checkpoint
the controller. A search killed anywhere resumes from the last
checkpoint: the pending archs are the same, finished ones are not evaluated
again, and the update is redone from the same state.

:func:`run_search_async` (``search.mode: async``): ``slots`` evaluations stay in
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

import dataclasses
import logging
import math
import queue
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

import atomicio
from nasfcos.arch import Arch
from nasfcos.errors import EvaluationLost, one_line
from nasfcos.search.halving import Ladder
from nasfcos.search.sample import Sample

log = logging.getLogger(__name__)
# Async mode compacts results.parquet at most this often (and at the end): at 64 slots a
# compaction per update would cost the flow's thread more than the controller does.
COMPACT_EVERY_S = 10.0


@dataclass(frozen=True)
class Job:
    """One evaluation: the arch and where it was sampled: ``step`` (controller
    updates before it was sampled) and ``sample`` (index among that policy's samples).
    Under successive halving also its ``rung``, the proxy ``epochs`` of that rung (None:
    the evaluator's own) and ``history``, the arch's rewards at the rungs below."""

    arch: Arch
    step: int
    sample: int
    rung: int = 0
    epochs: int | None = None
    history: tuple[float, ...] = ()
    alone: bool = False  # run with the device to itself (an out-of-memory beside others is retried so)


Evaluate = Callable[[list[Job]], Iterable[dict]]


class Future(Protocol):
    """One submitted evaluation, as the async loop needs it: ``concurrent.futures.Future``
    and Prefect's task futures both fit. ``result()`` is the evaluation record."""

    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...
    def result(self) -> Any: ...


Submit = Callable[[Job], Future]
Cost = Callable[[Arch], tuple[int, int]]  # arch -> (decoder params, decoder MACs), e.g. nasfcos.model.complexity.decoder_cost
# A policy whose draws are over budget this many times per arch it is asked for stops the search.
MAX_REJECTS_PER_SAMPLE = 1000


class Results(Protocol):
    """What the loop needs of the results table (``storage.results.ResultsTable``)."""

    def read(self) -> Any: ...
    def get(self, arch_id: str) -> dict | None: ...
    def append(self, rows: Iterable[dict]) -> int: ...
    def compact(self) -> int: ...


class Policy(Protocol):
    def sample(self, n: int) -> list[Sample]: ...
    def update(self, samples: list[Sample], rewards: list[float]) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class SearchConfig:
    """``total_archs``: unique archs to evaluate (paper: ~2,800); ``archs_per_step``:
    K archs per controller update; ``failure_penalty``: the reward a failed
    evaluation feeds the controller; ``max_samples``: stop after this many
    samples even if duplicates kept the unique count short (default 4x total);
    ``max_consecutive_failures``: a worker failing this many evaluations in a row is
    drained, see :class:`Failures`; ``max_attempts``: an arch lost this many times gets a
    ``failed`` row naming every attempt;
    ``lost_after_s``: async mode counts an evaluation without a result after this
    long as lost (a call hung in the device) and resubmits its arch;
    ``max_decoder_params`` / ``max_decoder_macs``: the cost constraint (module
    docstring), None = no limit; ``rungs`` (proxy epochs, two or more) and ``eta``:
    successive halving (module docstring; async mode only), ``()`` = one fidelity."""

    total_archs: int = 2800
    archs_per_step: int = 8
    failure_penalty: float = -10.0
    max_samples: int | None = None
    max_consecutive_failures: int = 20
    max_attempts: int = 3
    lost_after_s: float | None = None
    max_decoder_params: int | None = None
    max_decoder_macs: int | None = None
    rungs: tuple[int, ...] = ()
    eta: int = 3

    def __post_init__(self) -> None:
        if self.total_archs < 1 or self.archs_per_step < 1:
            raise ValueError(f"search config: total_archs and archs_per_step must be >= 1, got {self}")
        if not math.isfinite(self.failure_penalty):
            raise ValueError("search config: failure_penalty must be finite")
        if self.max_consecutive_failures < 1 or self.max_attempts < 1:
            raise ValueError(f"search config: max_consecutive_failures and max_attempts must be >= 1, got {self.max_consecutive_failures}, {self.max_attempts}")
        if len(self.rungs) == 1 or list(self.rungs) != sorted(set(self.rungs)) or min(self.rungs, default=1) < 1 or self.eta < 2:
            raise ValueError(f"search config: rungs {list(self.rungs)} must be () or >= 2 increasing epoch counts, eta >= 2 (got {self.eta})")


class SearchHalted(RuntimeError):
    """The circuit breaker: every worker was drained for failing evaluations in a row."""


class Failures:
    """The failure budgets of a search, per worker and per arch.

    Per worker (a Dask worker's address, or the device name): evaluations that failed on it
    in a row, arch failures (a ``failed`` row) and infrastructure failures (an evaluation
    that raised after its retries, or was lost) alike; only that worker's own success resets
    its count, never another's, so a sick GPU that fails fast is caught while the others
    succeed. ``limit`` in a row drain the worker (``drain(worker)``: the flow retires it, its
    archs go elsewhere; named in the log, the search summary and ``state.drained``, a history:
    a resumed search, in new processes, starts with every worker in service); when every worker seen is
    drained and none is busy (:meth:`check`) the search stops with :class:`SearchHalted`, so a broken machine or feature store
    fails the run loudly instead of filling the table with penalties or retrying forever.

    Per arch: its infrastructure failures (``state.attempts``, in the checkpoint, so a
    resume counts on); at ``max_attempts`` the arch is the one to blame (it does not fit the
    device, hits the timeout, trips a device assert) and gets a ``failed`` row naming every
    attempt, instead of being resubmitted until the search ends.
    """

    def __init__(self, limit: int, max_attempts: int, state: "SearchState", drain: Callable[[str], None] | None = None, on_halt: Callable[[], None] | None = None) -> None:
        self.limit, self.max_attempts, self.state, self.drain, self.on_halt = limit, max_attempts, state, drain, on_halt
        self.in_a_row: dict[str, int] = {}
        self.seen: set[str] = set()
        self.drained: set[str] = set()  # by this process; state.drained is the search's history (a resume starts afresh)
        self.last, self.last_run = "no evaluation failed in this process", 0

    def ok(self, worker: str) -> None:
        self.seen.add(worker)
        self.in_a_row[worker] = 0

    def failed(self, arch_id: str, error: str, *, worker: str, lost: bool) -> bool:
        """Count one failure; True when a lost arch has used up its attempts (the caller
        writes its failed row)."""
        self.seen.add(worker)
        n = self.in_a_row[worker] = self.in_a_row.get(worker, 0) + 1
        where = f" on {worker}" if worker else ""
        tries = self.state.attempts.setdefault(arch_id, []) if lost else []
        if lost:
            tries.append(f"{worker or '?'}: {error}")
        drains = n >= self.limit and worker not in self.drained
        exhausted = lost and not drains and len(tries) >= self.max_attempts
        if lost:
            what = f"lost{where}, attempt {len(tries)} of {self.max_attempts}" + ("; the arch is blamed" if exhausted else "; it will be evaluated again")
        else:
            what = f"failed{where}"
        log.warning("arch %s %s: %s [%d in a row on this worker]", arch_id, what, error, n)
        if drains:
            self.drained.add(worker)
            if worker not in self.state.drained:
                self.state.drained.append(worker)
            log.error("worker %s drained: %d evaluations in a row failed on it (last: %s: %s); its archs go to the other workers", worker or "(local)", n, arch_id, error)
            mine = f"{worker or '?'}: "
            for aid in list(self.state.attempts):  # the worker's failures were its own, not its archs'
                self.state.attempts[aid] = [t for t in self.state.attempts[aid] if not t.startswith(mine)]
            if self.drain is not None:
                self.drain(worker)
        self.last, self.last_run = f"{n} evaluations in a row failed{where} (last: {arch_id}: {error})", n
        return exhausted

    def check(self, busy: int) -> None:
        """Stop the search when every worker seen is drained and either no evaluation still
        running could show a live one (``busy``: evaluations in flight) or the last failure's
        worker has failed as often again since it was drained (draining did not take it out
        of service: nothing else takes the work)."""
        stuck = self.last_run >= 2 * self.limit
        if (not busy or stuck) and self.seen and self.seen <= self.drained:
            if self.on_halt is not None:
                self.on_halt()  # the checkpoint keeps the attempts and the drained workers for the resume
            raise SearchHalted(
                f"search stopped: every worker is drained ({', '.join(w or '(local)' for w in sorted(self.drained))}); {self.last}; "
                "fix the cause and run again to resume, or raise search.max_consecutive_failures"
            )


def lost_record(arch_id: str, exc: BaseException) -> dict:
    """What an evaluator yields for an evaluation that raised (infrastructure failure):
    where it ran and whether it should run again alone (``nasfcos.errors.EvaluationLost``)."""
    error = one_line(exc, with_type=not isinstance(exc, EvaluationLost))  # its message names the original error's type
    return {"arch_id": arch_id, "status": "lost", "error": error, "worker": getattr(exc, "worker", ""), "alone": getattr(exc, "kind", "") == "contention"}


def attempts_row(arch: Arch, attempts: Sequence[str], *, step: int, sample: int, penalty: float) -> dict:
    """The ``failed`` row of an arch lost ``search.max_attempts`` times, naming every attempt."""
    error = f"lost {len(attempts)} times: " + "; ".join(f"[{i}] {a}" for i, a in enumerate(attempts, 1))
    return _unevaluated_row(arch, "failed", one_line(error, with_type=False, limit=2000), params=-1, macs=-1, step=step, sample=sample, penalty=penalty)


def _unevaluated_row(arch: Arch, status: str, error: str, *, params: int, macs: int, step: int, sample: int, penalty: float) -> dict:
    """A results.parquet row the loop writes for an arch no evaluation scored (no losses, no times)."""
    now = datetime.now(timezone.utc)
    nan = float("nan")
    return {
        "arch_id": arch.arch_id, "arch": str(arch), "reward": nan, "loss_cls": nan, "loss_reg": nan, "loss_ctr": nan,
        "params": int(params), "macs": int(macs), "train_seconds": 0.0, "eval_seconds": 0.0, "peak_mem_mb": nan,
        "device": "", "seed": -1, "status": status, "error": error, "started_at": now, "finished_at": now,
        "step": step, "sample": sample, "reward_used": penalty, **arch.columns(),
    }  # fmt: skip


def worker_of(record: dict) -> str:
    """Where an evaluation ran: its ``worker`` (removed from the record: rows do not hold it),
    else its device."""
    return record.pop("worker", None) or record.get("device", "")


@dataclass
class SearchState:
    """What the controller checkpoint holds besides the policy.

    ``pending``: sync mode's samples of the current step (``Sample.to_dict``).
    Async mode's entries are ``{"step", "sample", "draw"}`` (``draw``: the
    ``Sample.to_dict``): ``queued`` were drawn and wait for a slot (draw order; on
    disk some may have been submitted since), ``in_flight`` were submitted (or wait
    for an identical arch that was), ``finished`` have a row but fed no update yet
    (finish order); ``drawn`` counts the samples of the current policy (the next
    ``sample`` index).
    """

    step: int = 0
    issued: int = 0
    pending: list[dict] | None = None
    stats: list[dict] = field(default_factory=list)
    in_flight: list[dict] = field(default_factory=list)
    finished: list[dict] = field(default_factory=list)
    drawn: int = 0
    queued: list[dict] = field(default_factory=list)
    rejected: int = 0  # draws over the cost constraint (never evaluated)
    attempts: dict[str, list[str]] = field(default_factory=dict)  # arch id -> its lost attempts ("worker: error")
    drained: list[str] = field(default_factory=list)  # workers the failure budget drained (history: a resumed search starts with all)


@dataclass
class SearchSummary:
    steps: int
    issued: int
    unique_archs: int
    evaluated_now: int  # archs evaluated by this call (first rung under successive halving)
    best_reward: float
    best_arch: str
    promoted_now: int = 0  # successive halving: evaluations of promoted archs by this call
    drained: tuple[str, ...] = ()  # workers the failure budget drained, this search's history


def load_state(path: Path, policy: Policy) -> SearchState:
    """Restore policy and loop state from ``path`` (fresh state when absent)."""
    if not path.exists():
        return SearchState()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read controller checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    policy.load_state_dict(ckpt["policy"])
    return SearchState(
        step=ckpt["step"], issued=ckpt["issued"], pending=ckpt["pending"], stats=ckpt["stats"],
        in_flight=ckpt.get("in_flight", []), finished=ckpt.get("finished", []), drawn=ckpt.get("drawn", 0),
        queued=ckpt.get("queued", []), rejected=ckpt.get("rejected", 0), attempts=ckpt.get("attempts", {}), drained=ckpt.get("drained", []),
    )  # fmt: skip


def save_state(path: Path, policy: Policy, state: SearchState, cfg: SearchConfig) -> None:
    """Atomic write (temp file + rename) of policy, optimiser, RNG, baseline and loop state."""
    # the state's fields as they are: asdict's deep copy of every queued draw (token masks) and
    # of the growing stats list cost more than the write itself
    loop = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    atomicio.write_with(path, lambda f: torch.save({"policy": policy.state_dict(), "config": asdict(cfg), **loop}, f))


def _checkpointer(path: Path, policy: Policy, state: SearchState, cfg: SearchConfig, fence: Callable[[], None] | None) -> Callable[[], None]:
    """The loop's checkpoint write: fenced first (a superseded flow stops here, see ``fence``)."""

    def checkpoint() -> None:
        if fence is not None:
            fence()
        save_state(path, policy, state, cfg)

    return checkpoint


def _known(results: Results) -> tuple[dict[str, dict], set[str]]:
    """(arch id -> row of every evaluated arch, ids of over-budget archs)."""
    df = results.read()
    rows = [] if df is None or len(df) == 0 else df.to_dict("records")
    return {r["arch_id"]: r for r in rows if r["status"] != "over_budget"}, {r["arch_id"] for r in rows if r["status"] == "over_budget"}


def over_budget_row(arch: Arch, *, params: int, macs: int, reason: str, step: int, sample: int, penalty: float) -> dict:
    """The results.parquet row of an arch the cost constraint kept from being evaluated."""
    return _unevaluated_row(arch, "over_budget", reason, params=params, macs=macs, step=step, sample=sample, penalty=penalty)


class _Budget:
    """The cost constraint of one search (module docstring): draws archs within it,
    writes each over-budget arch's row once."""

    def __init__(self, cfg: SearchConfig, cost: Cost | None, results: Results, over: set[str], state: SearchState) -> None:
        limited = cfg.max_decoder_params is not None or cfg.max_decoder_macs is not None
        if limited and cost is None:
            raise ValueError("search: max_decoder_params/max_decoder_macs are set but no cost function was given")
        self.cfg, self.cost, self.results, self.over, self.state = cfg, cost if limited else None, results, over, state

    def reason(self, arch: Arch) -> tuple[str, int, int]:
        """('' when within budget, else why not; params; MACs)."""
        params, macs = self.cost(arch)
        why = []
        if self.cfg.max_decoder_params is not None and params > self.cfg.max_decoder_params:
            why.append(f"decoder params {params:,} > search.max_decoder_params {self.cfg.max_decoder_params:,}")
        if self.cfg.max_decoder_macs is not None and macs > self.cfg.max_decoder_macs:
            why.append(f"decoder MACs {macs:,} > search.max_decoder_macs {self.cfg.max_decoder_macs:,}")
        return "; ".join(why), params, macs

    def draw(self, policy: Policy, n: int, *, step: int, first_sample: int) -> tuple[list[Sample], int]:
        """``n`` samples within budget and how many draws were rejected; a rejected arch
        not seen before gets its row (sample index ``first_sample + n + j``, j-th rejection)."""
        if self.cost is None:
            return policy.sample(n), 0
        out: list[Sample] = []
        rejected = 0
        while len(out) < n:
            for s in policy.sample(n - len(out)):
                why, params, macs = self.reason(s.arch)
                if not why:
                    out.append(s)
                    continue
                if s.arch.arch_id not in self.over:
                    row = over_budget_row(s.arch, params=params, macs=macs, reason=why, step=step, sample=first_sample + n + rejected, penalty=self.cfg.failure_penalty)
                    self.results.append([row])
                    self.over.add(s.arch.arch_id)
                rejected += 1
            if rejected > MAX_REJECTS_PER_SAMPLE * n:
                raise SearchHalted(
                    f"search stopped: {rejected} draws in a row were over the cost constraint for {len(out)} within it; raise search.max_decoder_macs / search.max_decoder_params"
                )
        self.state.rejected += rejected
        return out, rejected


def _reward(row: dict, penalty: float) -> float:
    return row["reward"] if row["status"] == "ok" else penalty


def _step_info(state: SearchState, known: dict[str, dict], cfg: SearchConfig, rewards: list[float], evaluated: int, stats: dict) -> dict:
    """The progress record of one controller update (``state.stats``, ``on_step``)."""
    best = _best(known)
    return {
        "step": state.step,
        "issued": state.issued,
        "unique_archs": len(known),
        "total_archs": cfg.total_archs,
        "evaluated_in_step": evaluated,
        "over_budget": state.rejected,
        "samples_fed": len(rewards),  # summed over the steps: the samples issued, each fed once
        "mean_reward": sum(rewards) / len(rewards),
        "best_reward": best["reward"] if best else float("nan"),
        **{f"policy_{k}": v for k, v in stats.items()},
    }


def _best(known: dict[str, dict]) -> dict | None:
    """The best ok row: the most rungs first (successive halving: the best at the highest
    fidelity), then the reward; ties: smallest arch_id."""
    ok = {a: r for a, r in known.items() if r["status"] == "ok"}
    best = max(sorted(ok), key=lambda a: (_rungs_reached(ok[a]), ok[a]["reward"]), default=None)
    return None if best is None else ok[best]


def _summary(state: SearchState, known: dict[str, dict], evaluated_now: int) -> SearchSummary:
    best = _best(known)
    return SearchSummary(
        steps=state.step,
        issued=state.issued,
        unique_archs=len(known),
        evaluated_now=evaluated_now,
        best_reward=best["reward"] if best else float("nan"),
        best_arch=best["arch"] if best else "",
        drained=tuple(state.drained),
    )


def make_row(record: dict, *, step: int, sample: int, penalty: float, rungs: Sequence[int] | None = None, history: Sequence[float] = ()) -> dict:
    """A results.parquet row from an evaluation record (``nasfcos.engine.proxy.evaluate_arch``):
    adds the step, the sample index, the arch's columns and ``reward_used`` (the penalty
    when failed).

    Fidelity columns: under successive halving ``rungs`` are the epochs of the rungs the
    arch has now completed (the last is this evaluation's) and ``history`` its rewards
    at the ones below; otherwise one rung of the record's ``epochs`` (when it has them).
    """
    row = dict(record)
    row.update(step=step, sample=sample, **Arch.parse(row["arch"]).columns())
    row["reward_used"] = row["reward"] if row["status"] == "ok" else penalty
    if rungs is not None:
        if len(history) != len(rungs) - 1:
            raise ValueError(f"make_row: {len(history)} rewards of lower rungs for rungs {list(rungs)}")
        row.update(epochs=rungs[-1], rung_epochs=list(rungs), rung_rewards=[*history, row["reward"]])
    elif "epochs" in row:
        row.update(rung_epochs=[row["epochs"]], rung_rewards=[row["reward"]])
    return row


def _rungs_reached(row: dict) -> int:
    """Rungs a results row has completed (at least 1: rows without fidelity columns count as one)."""
    return max(len(row.get("rung_epochs", ())), 1)


def run_search(
    *,
    policy: Policy,
    evaluate: Evaluate,
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
    appended immediately, so a crash loses no finished evaluation. An
    evaluator running elsewhere (a Prefect task) should also append its row
    itself (:func:`make_row`) before returning, which closes the window
    between finishing and the loop's append; appending twice is harmless
    (the table keeps one row per arch).
    ``on_step`` receives a small dict after every step (progress reporting).
    ``cost`` prices an arch for the cost constraint (module docstring). ``drain(worker)``
    takes a worker out of service when the failure budget drains it (:class:`Failures`).
    ``fence()`` raises when this search's flow no longer owns the run (a newer run epoch,
    ``storage.run_epoch``): called before every checkpoint write and every re-dispatch, so a
    superseded flow stops instead of overwriting the new owner's checkpoint.

    Exactly once: a lost evaluation's arch is evaluated again only when the table has no
    row for it (the evaluation may have written its row, then died); its reward feeds the
    update once, from its row.
    """
    if cfg.rungs:
        raise ValueError("successive halving (rungs) runs in the async loop only: its promotions are asynchronous (ASHA)")
    state_path = Path(state_path)
    atomicio.remove_orphans(state_path.parent, name=state_path.name, older_than=0)  # this search is its one writer
    state = load_state(state_path, policy)
    if state.in_flight or state.finished or state.queued:
        raise ValueError(
            f"{state_path}: holds an async-mode search ({len(state.in_flight)} archs in flight, {len(state.queued)} queued, "
            f"{len(state.finished)} finished before the next update); resume it with search.mode=async"
        )
    max_samples = cfg.max_samples or 4 * cfg.total_archs
    evaluated_now = 0
    checkpoint = _checkpointer(state_path, policy, state, cfg, fence)
    failures = Failures(cfg.max_consecutive_failures, cfg.max_attempts, state, drain, on_halt=checkpoint)
    known, over = _known(results)
    budget = _Budget(cfg, cost, results, over, state)
    if state.step or state.pending:
        log.info("resuming search at step %d (%d archs issued, %d in results)", state.step, state.issued, len(known))
    while True:
        if state.pending is None:
            remaining = cfg.total_archs - len(known)
            if remaining <= 0:
                break
            if state.issued >= max_samples:
                log.warning("stopping: %d samples issued but only %d unique archs (max_samples reached)", state.issued, len(known))
                break
            samples, _ = budget.draw(policy, min(cfg.archs_per_step, remaining), step=state.step, first_sample=0)
            state.pending = [s.to_dict() for s in samples]
            checkpoint()  # issued archs are durable before any is trained
        samples = [Sample.from_dict(d) for d in state.pending]

        todo: dict[str, tuple[int, Arch]] = {}
        for i, s in enumerate(samples):
            if s.arch.arch_id not in known and s.arch.arch_id not in todo:
                todo[s.arch.arch_id] = (i, s.arch)
        missing, alone = list(todo), set()
        while missing:  # lost evaluations are evaluated again (the failure budgets bound it)
            answered = set()
            for record in evaluate([Job(todo[a][1], state.step, todo[a][0], alone=a in alone) for a in missing]):
                aid = record["arch_id"]
                answered.add(aid)
                worker = worker_of(record)
                idx, arch = todo[aid]
                if record["status"] == "lost":
                    if fence is not None:
                        fence()  # a task stopped by a newer owner's epoch: this flow is superseded too
                    row = results.get(aid)  # it may have written its row, then been lost
                    if row is None and record.get("alone"):
                        log.warning("arch %s ran out of memory beside other evaluations on %s; evaluating it again alone", aid, worker or "its device")
                        alone.add(aid)
                        continue
                    if row is None and not failures.failed(aid, record["error"], worker=worker, lost=True):
                        continue
                    if row is None:
                        row = attempts_row(arch, state.attempts[aid], step=state.step, sample=idx, penalty=cfg.failure_penalty)
                        results.append([row])
                    else:
                        log.info("arch %s: lost after it wrote its row; the row stands, no second evaluation", aid)
                else:
                    row = make_row(record, step=state.step, sample=idx, penalty=cfg.failure_penalty)
                    results.append([row])
                    if row["status"] == "ok":
                        failures.ok(worker)
                    else:
                        failures.failed(aid, row["error"], worker=worker, lost=False)
                known[aid] = row
                state.attempts.pop(aid, None)
                evaluated_now += 1
            failures.check(busy=0)
            silent = [a for a in missing if a not in answered]  # neither a row nor a lost record: a broken evaluator
            if silent:
                raise RuntimeError(f"evaluator returned no record for {len(silent)} archs, e.g. {silent[0]}")
            missing = [a for a in missing if a not in known]

        rewards = [_reward(known[s.arch.arch_id], cfg.failure_penalty) for s in samples]
        stats = policy.update(samples, rewards)
        state.step += 1
        state.issued += len(samples)
        state.pending = None
        # archs this step added, counted from their rows: the same after a resume mid-step
        added = len({s.arch.arch_id for s in samples if known[s.arch.arch_id].get("step") == state.step - 1})
        info = _step_info(state, known, cfg, rewards, added, stats)
        state.stats.append(info)
        results.compact()
        checkpoint()
        log.info(
            "step %d: %d/%d archs, step mean reward %.4f, best %.4f",
            state.step, len(known), cfg.total_archs, info["mean_reward"], info["best_reward"],
        )  # fmt: skip
        if on_step is not None:
            on_step(info)

    return _summary(state, known, evaluated_now)


def run_search_async(
    *,
    policy: Policy,
    submit: Submit,
    slots: int,
    results: Results,
    state_path: str | Path,
    cfg: SearchConfig = SearchConfig(),
    on_step: Callable[[dict], None] | None = None,
    evaluator_writes_rows: bool = False,
    cost: Cost | None = None,
    drain: Callable[[str], None] | None = None,
    fence: Callable[[], None] | None = None,
) -> SearchSummary:
    """Run (or resume) the search with ``slots`` evaluations in flight until
    ``cfg.total_archs`` unique archs are in ``results`` (see the module docstring).

    ``evaluator_writes_rows``: the evaluation wrote its row durably before its future
    resolved (the Prefect task does), so the loop does not append it again: at 64 slots
    that append is a fifth of the flow thread's time per arch. ``cost``, ``drain``, ``fence``:
    as in :func:`run_search`; a lost arch is evaluated again only when the table has no row for it,
    and each evaluated arch feeds one update once.

    ``submit(job)`` starts one evaluation and returns a :class:`Future` whose
    result is its record (as ``evaluate`` yields in :func:`run_search`; the
    evaluator should append its own row too). Done callbacks only put the arch
    id on a queue; everything else runs in the calling thread. Callbacks rather
    than ``wait(..., FIRST_COMPLETED)``: ``concurrent.futures.wait`` takes only its
    own futures and ``prefect.futures.wait`` has no ``return_when``, while
    ``add_done_callback`` is what both kinds (and prefect-dask's) share.

    The checkpoint is written after every draw, before any of the drawn archs is
    submitted, so a submitted arch is always in ``queued`` or ``in_flight`` on
    disk; on resume, in-flight archs with a row count as finished (in the order
    their rows finished) and the others are resubmitted as the same job (same
    arch, step and sample index); queued ones go on in draw order, those with a
    row feeding their stored reward. An arch sampled again is not evaluated
    again: a known one feeds its stored reward at once, one still in flight waits
    for that evaluation. When nothing is left to sample or in flight, the last
    update uses the fewer than K left over.
    """
    if slots < 1:
        raise ValueError(f"slots: need at least 1 evaluation in flight, got {slots}")
    state_path = Path(state_path)
    atomicio.remove_orphans(state_path.parent, name=state_path.name, older_than=0)  # this search is its one writer
    state = load_state(state_path, policy)
    if state.pending is not None:
        raise ValueError(f"{state_path}: a sync-mode step is pending; finish it with search.mode=sync first")
    max_samples = cfg.max_samples or 4 * cfg.total_archs
    K = cfg.archs_per_step
    known, over = _known(results)
    budget = _Budget(cfg, cost, results, over, state)
    checkpoint = _checkpointer(state_path, policy, state, cfg, fence)
    failures = Failures(cfg.max_consecutive_failures, cfg.max_attempts, state, drain, on_halt=checkpoint)
    done: queue.SimpleQueue[tuple[str, Future]] = queue.SimpleQueue()  # put by done callbacks (any thread)
    running: dict[str, Future] = {}  # one evaluation per arch id
    started: dict[str, float] = {}  # arch id -> when its evaluation was submitted (lost_after_s)
    evaluated_now = evaluated_since_update = promoted_now = 0
    compacted = time.monotonic()  # the last compaction (async: at most every COMPACT_EVERY_S)
    ladder = Ladder(cfg.rungs, cfg.eta) if cfg.rungs else None

    ids: dict[str, str] = {}  # arch string -> id: the loop looks ids up for every entry in flight per result

    def arch_id(entry: dict) -> str:
        text = entry["draw"]["arch"]
        if text not in ids:
            ids[text] = Arch.parse(text).arch_id
        return ids[text]

    def launch(entry: dict, alone: bool = False) -> None:
        aid = arch_id(entry)
        if aid not in running:
            rung = entry.get("rung", 0)
            fidelity = {} if ladder is None else {"rung": rung, "epochs": cfg.rungs[rung], "history": tuple(known[aid]["rung_rewards"][:rung]) if rung else ()}
            future = submit(Job(Arch.parse(entry["draw"]["arch"]), entry["step"], entry["sample"], alone=alone, **fidelity))
            running[aid], started[aid] = future, time.monotonic()
            future.add_done_callback(lambda f, aid=aid: done.put((aid, f)))

    def next_done() -> tuple[str, dict]:
        """The next finished evaluation's (arch id, record); one that raised, or has run
        past ``lost_after_s`` (its slot's thread hung in a device call, say), gives
        a ``lost`` record."""
        while True:
            wait = None if cfg.lost_after_s is None else max(0.0, min(started.values()) + cfg.lost_after_s - time.monotonic())
            try:
                aid, future = done.get(timeout=wait)
            except queue.Empty:
                aid = min(started, key=started.get)
                running.pop(aid), started.pop(aid)
                return aid, lost_record(aid, TimeoutError(f"no result after {cfg.lost_after_s:.0f} s"))
            if running.get(aid) is not future:
                continue  # a lost evaluation that ended after all: its arch was resubmitted
            running.pop(aid), started.pop(aid)
            try:
                return aid, future.result()
            except Exception as e:  # noqa: BLE001 - an infrastructure failure after the task's retries
                return aid, lost_record(aid, e)

    def new_in_flight() -> int:
        """Archs in flight for their first evaluation (the others are promotions)."""
        return len(running) if ladder is None else sum(1 for a in running if a not in known)

    def can_draw() -> bool:
        return len(known) + new_in_flight() < cfg.total_archs and state.issued < max_samples

    def draw() -> None:
        """Queue K archs (or one per free slot) from the current policy; the caller saves."""
        n = min(max(K, slots - len(running)), cfg.total_archs - len(known) - new_in_flight(), max_samples - state.issued)
        samples, rejected = budget.draw(policy, n, step=state.step, first_sample=state.drawn)
        state.queued = [{"step": state.step, "sample": state.drawn + i, "draw": s.to_dict()} for i, s in enumerate(samples)]
        state.drawn += n + rejected

    def update(n: int) -> None:
        nonlocal evaluated_since_update, compacted
        batch, state.finished = state.finished[:n], state.finished[n:]
        state.queued = []  # drawn by the policy this update replaces, never submitted: dropped
        samples = [Sample.from_dict(e["draw"]) for e in batch]
        rewards = [_reward(known[s.arch.arch_id], cfg.failure_penalty) for s in samples]
        stats = policy.update(samples, rewards)
        stale = sum(state.step - e["step"] for e in batch) / len(batch)  # updates between sampling and learning
        state.step += 1
        state.drawn = 0
        info = {**_step_info(state, known, cfg, rewards, evaluated_since_update, stats), "in_flight": len(running), "staleness": stale}
        evaluated_since_update = 0
        state.stats.append(info)
        if time.monotonic() - compacted >= COMPACT_EVERY_S:
            results.compact()
            compacted = time.monotonic()
        if can_draw():
            draw()  # the new policy's next archs, in the same checkpoint
        checkpoint()
        log.info(
            "step %d: %d/%d archs, %d in flight, step mean reward %.4f, best %.4f",
            state.step, len(known), cfg.total_archs, len(running), info["mean_reward"], info["best_reward"],
        )  # fmt: skip
        if on_step is not None:
            on_step(info)

    if state.step or state.in_flight or state.finished or state.queued:
        log.info(
            "resuming async search at step %d (%d archs issued, %d in flight, %d queued, %d in results)",
            state.step, state.issued, len(state.in_flight), len(state.queued), len(known),
        )  # fmt: skip

    def has_row(entry: dict) -> bool:
        """Whether the evaluation of an in-flight entry (at its rung) has its row."""
        aid = arch_id(entry)
        return aid in known and _rungs_reached(known[aid]) > entry.get("rung", 0)

    # a finished arch whose row is gone (a damaged file quarantined since): evaluated again
    gone = [e for e in state.finished if arch_id(e) not in known]
    if gone:
        log.warning("%d finished archs have no row any more (quarantined?); evaluating them again, e.g. %s", len(gone), arch_id(gone[0]))
        state.finished = [e for e in state.finished if arch_id(e) in known]
        state.in_flight += gone
    # rows are durable before the loop learns of them: an in-flight arch with a row finished
    landed = sorted((e for e in state.in_flight if has_row(e)), key=lambda e: known[arch_id(e)]["finished_at"])
    state.in_flight = [e for e in state.in_flight if not has_row(e)]
    state.finished += [e for e in landed if e.get("rung", 0) == 0]  # a promotion fed the policy when its first rung ended
    if ladder is not None:
        for aid, row in known.items():
            ladder.finished(aid, row["rung_rewards"])
        for entry in state.in_flight:
            if entry.get("rung", 0):
                ladder.start(arch_id(entry), entry["rung"])
    for entry in state.in_flight:
        launch(entry)

    while True:
        if len(state.finished) >= K:
            update(K)
        elif len(running) < slots and ladder is not None and (promotion := ladder.promotion()) is not None:
            aid, rung = promotion
            row = known[aid]  # its row keeps where it was sampled; the entry has no draw to learn from
            entry = {"step": int(row["step"]), "sample": int(row["sample"]), "draw": {"arch": row["arch"]}, "rung": rung}
            ladder.start(aid, rung)
            state.in_flight.append(entry)
            checkpoint()  # on disk before it is submitted
            launch(entry)
        elif len(running) < slots and (state.queued or can_draw()):
            if not state.queued:
                draw()
                checkpoint()  # on disk before any of them is submitted
            entry = state.queued.pop(0)
            state.issued += 1  # a sample counts once it enters the search, not when drawn (an update drops the rest)
            aid = arch_id(entry)
            if aid in known:  # seen before: its stored reward, no evaluation
                state.finished.append(entry)
            else:
                state.in_flight.append(entry)
                launch(entry)  # or, for an arch already in flight, wait for that evaluation
        elif running:
            aid, record = next_done()
            if record["arch_id"] != aid:
                raise RuntimeError(f"evaluation of {aid} returned the record of {record['arch_id']}")
            mine = [e for e in state.in_flight if arch_id(e) == aid]  # one rung: a promotion waits for its lower rung's row
            rung = mine[0].get("rung", 0)
            worker = worker_of(record)
            if record["status"] == "lost":
                if fence is not None:
                    fence()  # a task stopped by a newer owner's epoch: this flow is superseded too
                row = results.get(aid)  # it may have written its row, then been lost
                if row is not None and _rungs_reached(row) > rung:
                    log.info("arch %s: lost after it wrote its row; the row stands, no second evaluation", aid)
                elif record.get("alone"):
                    log.warning("arch %s ran out of memory beside other evaluations on %s; evaluating it again alone", aid, worker or "its device")
                    launch(mine[0], alone=True)
                    continue
                elif not failures.failed(aid, record["error"], worker=worker, lost=True):
                    failures.check(busy=len(running))
                    launch(mine[0])  # the same job again; the arch is not marked failed
                    continue
                else:
                    row = attempts_row(Arch.parse(mine[0]["draw"]["arch"]), state.attempts[aid], step=mine[0]["step"], sample=mine[0]["sample"], penalty=cfg.failure_penalty)
                    if ladder is not None:
                        below = list(known[aid]["rung_rewards"][:rung]) if rung else []
                        row.update(epochs=cfg.rungs[rung], rung_epochs=list(cfg.rungs[: rung + 1]), rung_rewards=[*below, float("nan")])
                    results.append([row])
            else:
                fidelity = {} if ladder is None else {"rungs": cfg.rungs[: rung + 1], "history": known[aid]["rung_rewards"][:rung] if rung else ()}
                row = make_row(record, step=mine[0]["step"], sample=mine[0]["sample"], penalty=cfg.failure_penalty, **fidelity)
                if not evaluator_writes_rows:
                    results.append([row])
                if row["status"] == "ok":
                    failures.ok(worker)
                else:
                    failures.failed(aid, row["error"], worker=worker, lost=False)
                    failures.check(busy=len(running))
            known[aid] = row
            state.attempts.pop(aid, None)
            state.in_flight = [e for e in state.in_flight if arch_id(e) != aid]
            if ladder is not None:
                ladder.finished(aid, row["rung_rewards"])
            if rung:
                promoted_now += 1
            else:
                evaluated_now += 1
                evaluated_since_update += 1
                state.finished += mine
        elif state.finished:  # nothing left to sample or wait for: learn from the rest
            update(len(state.finished))
        else:
            break
    if len(known) < cfg.total_archs:
        log.warning("stopping: %d samples issued but only %d unique archs (max_samples reached)", state.issued, len(known))
    results.compact()
    checkpoint()
    return dataclasses.replace(_summary(state, known, evaluated_now), promoted_now=promoted_now)
