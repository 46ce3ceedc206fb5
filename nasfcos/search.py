"""The search loop (NAS-FCOS §3.3): sample decoders, score them on the proxy task,
update the controller; resumable at any point. Plain Python: the Prefect flow
injects an ``evaluate`` that fans the archs out to parallel tasks.

Per step: sample K archs (recorded in the controller checkpoint *before* any is
evaluated), evaluate those not yet in the results table, append each record as
it arrives, update the policy with the rewards of all K (stored rewards for
archs seen before; ``failure_penalty`` for failed ones), compact the table and
checkpoint the controller. A search killed anywhere resumes from the last
checkpoint: the pending archs are the same, finished ones are not evaluated
again, and the update is redone from the same state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from nasfcos.controller import Sample
from nasfcos.train import atomic_save
from nasfcos.space import Arch

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Job:
    """One evaluation: the arch and where it was sampled (step, index in the step)."""

    arch: Arch
    step: int
    sample: int


Evaluate = Callable[[list[Job]], Iterable[dict]]


class Results(Protocol):
    """What the loop needs of the results table (``storage.results.ResultsTable``)."""

    def read(self) -> Any: ...
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
    samples even if duplicates kept the unique count short (default 4x total)."""

    total_archs: int = 2800
    archs_per_step: int = 8
    failure_penalty: float = -10.0
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.total_archs < 1 or self.archs_per_step < 1:
            raise ValueError(f"search config: total_archs and archs_per_step must be >= 1, got {self}")
        if not math.isfinite(self.failure_penalty):
            raise ValueError("search config: failure_penalty must be finite")


@dataclass
class SearchState:
    """What the controller checkpoint holds besides the policy."""

    step: int = 0
    issued: int = 0
    pending: list[dict] | None = None
    stats: list[dict] = field(default_factory=list)


@dataclass
class SearchSummary:
    steps: int
    issued: int
    unique_archs: int
    evaluated_now: int
    best_reward: float
    best_arch: str


def load_state(path: Path, policy: Policy) -> SearchState:
    """Restore policy and loop state from ``path`` (fresh state when absent)."""
    if not path.exists():
        return SearchState()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read controller checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    policy.load_state_dict(ckpt["policy"])
    return SearchState(step=ckpt["step"], issued=ckpt["issued"], pending=ckpt["pending"], stats=ckpt["stats"])


def save_state(path: Path, policy: Policy, state: SearchState, cfg: SearchConfig) -> None:
    """Atomic write (temp file + rename) of policy, optimiser, RNG, baseline and loop state."""
    atomic_save({"policy": policy.state_dict(), "config": asdict(cfg), **asdict(state)}, path)


def _known(results: Results) -> dict[str, dict]:
    df = results.read()
    return {} if df is None or len(df) == 0 else {r["arch_id"]: r for r in df.to_dict("records")}


def make_row(record: dict, *, step: int, sample: int, penalty: float) -> dict:
    """A results.parquet row from an evaluation record (``nasfcos.proxy.evaluate_arch``):
    adds the step, the sample index and ``reward_used`` (the penalty when failed)."""
    row = dict(record)
    row.update(step=step, sample=sample)
    row["reward_used"] = row["reward"] if row["status"] == "ok" else penalty
    return row


def run_search(
    *,
    policy: Policy,
    evaluate: Evaluate,
    results: Results,
    state_path: str | Path,
    cfg: SearchConfig = SearchConfig(),
    on_step: Callable[[dict], None] | None = None,
) -> SearchSummary:
    """Run (or resume) the search until ``cfg.total_archs`` unique archs are in ``results``.

    ``evaluate(jobs)`` yields one record per job (fields of
    ``nasfcos.proxy.evaluate_arch``), in any order, as they finish; each is
    appended immediately, so a crash loses no finished evaluation. An
    evaluator running elsewhere (a Prefect task) should also append its row
    itself (:func:`make_row`) before returning, which closes the window
    between finishing and the loop's append; appending twice is harmless
    (the table keeps one row per arch).
    ``on_step`` receives a small dict after every step (progress reporting).
    """
    state_path = Path(state_path)
    state = load_state(state_path, policy)
    max_samples = cfg.max_samples or 4 * cfg.total_archs
    evaluated_now = 0
    known = _known(results)
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
            samples = policy.sample(min(cfg.archs_per_step, remaining))
            state.pending = [s.to_dict() for s in samples]
            save_state(state_path, policy, state, cfg)  # issued archs are durable before any is trained
        samples = [Sample.from_dict(d) for d in state.pending]

        todo: dict[str, tuple[int, Arch]] = {}
        for i, s in enumerate(samples):
            if s.arch.arch_id not in known and s.arch.arch_id not in todo:
                todo[s.arch.arch_id] = (i, s.arch)
        if todo:
            for record in evaluate([Job(a, state.step, i) for i, a in todo.values()]):
                idx, _ = todo[record["arch_id"]]
                row = make_row(record, step=state.step, sample=idx, penalty=cfg.failure_penalty)
                results.append([row])
                known[row["arch_id"]] = row
                evaluated_now += 1
                if row["status"] != "ok":
                    log.warning("arch %s failed: %s", row["arch_id"], row["error"])
        missing = [a for a in todo if a not in known]
        if missing:
            raise RuntimeError(f"evaluator returned no record for {len(missing)} archs, e.g. {missing[0]}")

        rewards = [known[s.arch.arch_id]["reward"] if known[s.arch.arch_id]["status"] == "ok" else cfg.failure_penalty for s in samples]
        stats = policy.update(samples, rewards)
        state.step += 1
        state.issued += len(samples)
        state.pending = None
        ok = [r["reward"] for r in known.values() if r["status"] == "ok"]
        info = {
            "step": state.step,
            "issued": state.issued,
            "unique_archs": len(known),
            "total_archs": cfg.total_archs,
            "evaluated_in_step": len(todo),
            "mean_reward": sum(rewards) / len(rewards),
            "best_reward": max(ok) if ok else float("nan"),
            **{f"policy_{k}": v for k, v in stats.items()},
        }
        state.stats.append(info)
        results.compact()
        save_state(state_path, policy, state, cfg)
        log.info(
            "step %d: %d/%d archs, step mean reward %.4f, best %.4f",
            state.step, len(known), cfg.total_archs, info["mean_reward"], info["best_reward"],
        )  # fmt: skip
        if on_step is not None:
            on_step(info)

    ok = {a: r for a, r in known.items() if r["status"] == "ok"}
    best = max(sorted(ok), key=lambda a: ok[a]["reward"], default=None)  # ties: smallest arch_id
    return SearchSummary(
        steps=state.step,
        issued=state.issued,
        unique_archs=len(known),
        evaluated_now=evaluated_now,
        best_reward=ok[best]["reward"] if best else float("nan"),
        best_arch=ok[best]["arch"] if best else "",
    )
