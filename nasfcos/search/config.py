"""What the search loop is given: its settings (:class:`SearchConfig`), the unit of work it
hands an evaluator (:class:`Job`), and what it needs of the policy, the results table and
an evaluation's future (protocols, so tests and benchmarks can stand in for them)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from nasfcos.arch import Arch
from nasfcos.search.sample import Sample


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
    and ``distributed`` futures both fit. ``result()`` is the evaluation record."""

    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...
    def result(self) -> Any: ...


Submit = Callable[[Job], Future]


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
    successive halving (nasfcos.search.halving; async mode only), ``()`` = one fidelity."""

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
