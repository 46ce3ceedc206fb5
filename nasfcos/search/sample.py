"""What every search policy hands the search loop: a sampled arch with what PPO needs to
re-score it, and the kind check every policy's ``load_state_dict`` makes.

Letter legend: T tokens, A max choices per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nasfcos.arch import Arch


@dataclass
class Sample:
    """One sampled arch with what PPO needs to re-score it: tokens (T,), validity
    masks (T, A) and the log-probability under the sampling policy."""

    arch: Arch
    tokens: np.ndarray
    masks: np.ndarray
    logp: float
    entropy: float

    def to_dict(self) -> dict:
        return {"arch": str(self.arch), "tokens": self.tokens.tolist(), "masks": self.masks.tolist(), "logp": self.logp, "entropy": self.entropy}

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        return cls(
            arch=Arch.parse(d["arch"]),
            tokens=np.asarray(d["tokens"], dtype=np.int64),
            masks=np.asarray(d["masks"], dtype=bool),
            logp=float(d["logp"]),
            entropy=float(d["entropy"]),
        )


def check_kind(state: dict, kind: str, head: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"controller state is for a {state.get('kind')!r} policy, not {kind!r}")
    # states written before the seq head space existed searched the dag head
    if state.get("head", "dag") != head:
        raise ValueError(f"controller state searched the {state.get('head', 'dag')!r} head space, not {head!r} (search.head)")
