"""What a search keeps on disk besides its rows: the controller checkpoint's loop state
(``SearchState``), written atomically after every draw and update, and the summaries
built from it and the rows."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import atomicio
from nasfcos.search.rows import best_row

if TYPE_CHECKING:
    from nasfcos.search.config import Policy, Results, SearchConfig


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
    ckpt = _read(path)
    policy.load_state_dict(ckpt["policy"])
    return SearchState(**loop_state(path, ckpt))


def loop_state(path: Path, ckpt: dict | None = None) -> dict:
    """The loop state fields of the checkpoint at ``path`` (``SearchState``'s names), no policy needed."""
    ckpt = _read(path) if ckpt is None else ckpt
    # JSON text; checkpoints before 2026-12-04 pickled the fields beside the policy
    loop = json.loads(ckpt["loop"]) if "loop" in ckpt else ckpt
    names = {f.name for f in dataclasses.fields(SearchState)}
    return {k: v for k, v in loop.items() if k in names}


def _read(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read controller checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def save_state(path: Path, policy: Policy, state: SearchState, cfg: SearchConfig) -> None:
    """Atomic write (temp file + rename) of policy, optimiser, RNG, baseline and loop state."""
    # the loop state (queued draws with their token masks, the growing stats list) as one JSON
    # text: torch.save pickles every list element through its persistent_id hook (70 ms per
    # checkpoint at 2,000 archs, 10 ms per arch; JSON: a few ms)
    loop = json.dumps({f.name: getattr(state, f.name) for f in dataclasses.fields(state)}, default=_plain)
    atomicio.write_with(path, lambda f: torch.save({"policy": policy.state_dict(), "config": asdict(cfg), "loop": loop}, f))


def _plain(value):
    """numpy scalars (a policy's stats) as Python numbers for JSON."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"loop state: {type(value).__name__} is not JSON serialisable")


def checkpointer(path: Path, policy: Policy, state: SearchState, cfg: SearchConfig, fence: Callable[[], None] | None) -> Callable[[], None]:
    """The loop's checkpoint write: fenced first (a superseded flow stops here, see ``fence``)."""

    def checkpoint() -> None:
        if fence is not None:
            fence()
        save_state(path, policy, state, cfg)

    return checkpoint


def known_rows(results: Results) -> tuple[dict[str, dict], set[str]]:
    """(arch id -> row of every evaluated arch, ids of over-budget archs)."""
    df = results.read()
    rows = [] if df is None or len(df) == 0 else df.to_dict("records")
    return {r["arch_id"]: r for r in rows if r["status"] != "over_budget"}, {r["arch_id"] for r in rows if r["status"] == "over_budget"}


def step_info(state: SearchState, known: dict[str, dict], cfg: SearchConfig, rewards: list[float], evaluated: int, stats: dict) -> dict:
    """The progress record of one controller update (``state.stats``, ``on_step``)."""
    best = best_row(known)
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


def summary(state: SearchState, known: dict[str, dict], evaluated_now: int) -> SearchSummary:
    best = best_row(known)
    return SearchSummary(
        steps=state.step,
        issued=state.issued,
        unique_archs=len(known),
        evaluated_now=evaluated_now,
        best_reward=best["reward"] if best else float("nan"),
        best_arch=best["arch"] if best else "",
        drained=tuple(state.drained),
    )
