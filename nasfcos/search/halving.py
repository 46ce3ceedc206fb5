"""Successive halving over proxy epochs, asynchronous as in ASHA (Li et al., MLSys'20).

Beyond the paper, which trains every sampled decoder for the full proxy task. Rungs
are proxy epoch counts, e.g. 3, 7, 15 (the last is the full task), and eta the
reduction factor (3). Every new arch is trained to the first rung; whenever an
evaluation slot frees, the search loop (``nasfcos.search.asynchronous.AsyncSearch``) asks
:meth:`Ladder.promotion` first: the best arch, in the highest rung that has one, that
ranks in the top ``floor(n / eta)`` of the ``n`` archs finished in its rung and has not
been promoted yet goes on to the next rung; only when there is none is a new arch
drawn. So no slot waits for a rung to fill (ASHA), a rung's top 1/eta is judged among
the archs finished so far, and each arch's rungs are a prefix of the ladder. A failed
evaluation ranks last and is never promoted.

A promoted arch resumes from the state its lower rung saved (decoder, EMA weights,
Adam moments, the data-order generator: :func:`pack_state` / :func:`unpack_state`;
``nasfcos.engine.proxy.evaluate_arch``'s ``resume`` and ``keep_state``), so training 3 then
4 more epochs gives the weights of training 7 at once and costs 4 epochs. Where the
state lives is the caller's business (``storage.rung_states``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import torch


class Ladder:
    """ASHA's bookkeeping: the rewards of the archs finished in each rung and the archs
    taken to each rung (finished there or in flight)."""

    def __init__(self, rungs: Sequence[int], eta: int) -> None:
        if len(rungs) < 2 or list(rungs) != sorted(set(rungs)) or min(rungs) < 1:
            raise ValueError(f"rungs {list(rungs)}: need at least 2 strictly increasing epoch counts >= 1")
        if eta < 2:
            raise ValueError(f"eta must be >= 2, got {eta}")
        self.rungs, self.eta = tuple(rungs), eta
        self.done: list[dict[str, float]] = [{} for _ in rungs]  # arch id -> reward (-inf: failed)
        self.taken: list[set[str]] = [set() for _ in rungs]
        self._next: tuple[str, int] | None | bool = False  # cached answer of promotion(); False: stale

    def finished(self, arch_id: str, rewards: Sequence[float]) -> None:
        """An arch's rewards at rungs 0..r (a results row's ``rung_rewards``); NaN = failed."""
        for r, v in enumerate(rewards):
            self.done[r][arch_id] = v if math.isfinite(v) else -math.inf
            self.taken[r].add(arch_id)
        self._next = False

    def start(self, arch_id: str, rung: int) -> None:
        """``arch_id`` was sent to ``rung`` (a promotion, in flight)."""
        self.taken[rung].add(arch_id)
        self._next = False

    def top(self, rung: int) -> list[str]:
        """The top ``floor(n / eta)`` of the ``n`` archs finished in ``rung``, best first
        (ties: smaller arch id), failed ones excluded."""
        done = self.done[rung]
        best = sorted(done, key=lambda a: (-done[a], a))[: len(done) // self.eta]
        return [a for a in best if done[a] > -math.inf]

    def promotion(self) -> tuple[str, int] | None:
        """(arch id, rung to train it to) of the next promotion, or None."""
        if self._next is False:
            self._next = None
            for r in reversed(range(len(self.rungs) - 1)):
                waiting = [a for a in self.top(r) if a not in self.taken[r + 1]]
                if waiting:
                    self._next = (waiting[0], r + 1)
                    break
        return self._next  # type: ignore[return-value]


def pack_state(state: dict) -> bytes:
    """A proxy training state (``evaluate_arch``'s ``keep_state``) as bytes, to be stored."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def unpack_state(data: bytes) -> dict:
    """The state :func:`pack_state` stored, on the CPU (``evaluate_arch`` moves it)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
