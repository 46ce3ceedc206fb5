"""The search policies by name (``search.policy``): PPO (the paper), random search, and
regularised evolution; :func:`build_policy` is the one place a name becomes a policy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from nasfcos.arch import DEFAULT_HEAD_SEARCH, token_space
from nasfcos.search.controller import ControllerConfig, PPOController
from nasfcos.search.evolution import EvolutionConfig, EvolutionPolicy
from nasfcos.search.sample import Sample, check_kind


class RandomPolicy:
    """Uniform choice among the valid tokens: the random-search baseline, with
    the controller's interface (``update`` learns nothing)."""

    def __init__(self, *, seed: int = 0, head: str = DEFAULT_HEAD_SEARCH) -> None:
        self.space = token_space(head)
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> list[Sample]:
        out = []
        for _ in range(n):
            tokens, masks = [], []
            for _ in self.space.tokens:
                m = self.space.mask(tokens)
                masks.append(m)
                tokens.append(int(self.rng.choice(np.flatnonzero(m))))
            logp = -float(sum(np.log(m.sum()) for m in masks))
            out.append(Sample(self.space.decode(tokens), np.asarray(tokens), np.stack(masks), logp, -logp))
        return out

    def update(self, samples: list[Sample], rewards: list[float]) -> dict[str, float]:
        return {"mean_reward": float(np.mean(rewards))} if rewards else {}

    def state_dict(self) -> dict:
        return {"kind": "random", "head": self.space.head, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        check_kind(state, "random", self.space.head)
        self.rng.bit_generator.state = state["rng"]


POLICIES = ("ppo", "random", "evolution")


def build_policy(
    kind: str,
    *,
    seed: int = 0,
    config: ControllerConfig | None = None,
    head: str = DEFAULT_HEAD_SEARCH,
    ops: Sequence[str] | None = None,
    evolution: EvolutionConfig | None = None,
    warm_start: Iterable[tuple[str, float]] = (),
) -> PPOController | RandomPolicy | EvolutionPolicy:
    """The search policy ``kind`` (``search.policy``) over head space ``head`` with only
    ``ops`` allowed (``search.ops``; None: all): ``config`` is PPO's, ``evolution`` and
    ``warm_start`` (arch string, reward) are regularised evolution's (``nasfcos.search.evolution``)."""
    head = token_space(head, ops)  # the policies take a TokenSpace where they take a head name
    if kind == "ppo":
        return PPOController(config or ControllerConfig(), seed=seed, head=head)
    if kind == "random":
        return RandomPolicy(seed=seed, head=head)
    if kind == "evolution":
        return EvolutionPolicy(evolution or EvolutionConfig(), seed=seed, head=head, warm_start=warm_start)
    raise ValueError(f"unknown policy {kind!r}; known: {', '.join(POLICIES)}")
