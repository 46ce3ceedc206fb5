"""The failure budgets of a search: per worker (a sick machine is drained, a broken
cluster stops the search loudly) and per arch (an arch lost too often is blamed)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nasfcos.search.state import SearchState

log = logging.getLogger("nasfcos.search.loop")


class SearchHalted(RuntimeError):
    """The circuit breaker: every worker was drained for failing evaluations in a row."""


class Failures:
    """The failure budgets of a search, per worker and per arch.

    Per worker (a Dask worker's address, or the device name): evaluations that failed on it
    in a row, arch failures (a ``failed`` row) and infrastructure failures (an evaluation
    that raised, or was lost) alike; only that worker's own success resets
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
