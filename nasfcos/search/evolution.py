"""Regularised ("aging") evolution as a search policy (Real et al., AAAI'19, Algorithm 1).

Beyond the paper, which searches with an LSTM + PPO only (``nasfcos.search.controller``).
The population is the P most recent evaluated archs, oldest first. Each child is
a one-token mutation of the best of S members drawn at random (without replacement,
as NASLib does); every result the search feeds back joins the population as its
youngest member and the oldest dies, whatever its reward ("aging": a lucky noisy
reward lives only P results). Until the population holds P members, children are
random archs (Algorithm 1's initial population).

Mutation works on the token sequence of a :class:`~nasfcos.arch.TokenSpace`: one
position, uniform among those with another valid choice, gets a different valid
value (uniform); the tokens after it are re-validated in order with
``TokenSpace.mask`` and a token that is no longer allowed is redrawn uniformly among
the allowed ones. Only FPN input tokens can become invalid (a later block may read at
most 4 distinct block outputs, so changing one input can forbid a later one); every
child decodes to a valid :class:`~nasfcos.arch.Arch`.

Defaults P = 64, S = 16: Real et al. use P = 100, S = 25 for 20,000 models; the
paper's search evaluates ~2,800, so the population is scaled down to turn over ~44
times (Real et al.'s: 200) while S/P = 1/4 keeps their selection pressure
(``benchmarks/strategies.py`` compares strategies at equal budget).

Warm start: ``warm_start`` members (arch string, reward) in age order, e.g. the
``ok`` rows of an earlier ``results.parquet``; the P best of those in this head
space form the initial population (kept in age order), so children are mutations
from the first sample on.

Same interface as the controller's policies (``sample``, ``update``, ``state_dict``,
``load_state_dict``), so the sync and async search loops drive it unchanged; its
samples carry log-probability and entropy 0 (there is no distribution to re-score).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from nasfcos.arch import DEFAULT_HEAD_SEARCH, Arch, ArchError, TokenSpace, token_space
from nasfcos.search.sample import Sample, check_kind


@dataclass(frozen=True)
class EvolutionConfig:
    population: int = 64  # P
    sample_size: int = 16  # S, the tournament size

    def __post_init__(self) -> None:
        if not 1 <= self.sample_size <= self.population:
            raise ValueError(f"evolution config: need 1 <= sample_size <= population, got {self}")


def mutate(tokens: Sequence[int], space: TokenSpace, rng: np.random.Generator) -> list[int]:
    """A copy of ``tokens`` with one token changed to another valid value and the tokens
    after it re-validated (see the module docstring)."""
    tokens = [int(t) for t in tokens]
    masks = [space.mask(tokens[:i]) for i in range(len(tokens))]
    movable = [i for i, m in enumerate(masks) if m.sum() > 1]
    pos = int(rng.choice(movable))
    others = np.flatnonzero(masks[pos] & (np.arange(len(masks[pos])) != tokens[pos]))
    tokens[pos] = int(rng.choice(others))
    for i in range(pos + 1, len(tokens)):
        allowed = space.mask(tokens[:i])
        if not allowed[tokens[i]]:
            tokens[i] = int(rng.choice(np.flatnonzero(allowed)))
    return tokens


class EvolutionPolicy:
    """Aging evolution (module docstring) over the token space of ``head``."""

    def __init__(
        self,
        cfg: EvolutionConfig = EvolutionConfig(),
        *,
        seed: int = 0,
        head: str = DEFAULT_HEAD_SEARCH,
        warm_start: Iterable[tuple[str, float]] = (),
    ) -> None:
        self.cfg = cfg
        self.space = token_space(head)
        self.rng = np.random.default_rng(seed)
        self.members: list[list[int]] = []  # oldest first
        self.rewards: list[float] = []
        warm = []
        for text, reward in warm_start:
            try:
                tokens = self.space.encode(Arch.parse(text))
            except ArchError:
                continue  # not in this head space (e.g. an FCOS head)
            if np.isfinite(reward):
                warm.append((tokens, float(reward)))
        best = sorted(range(len(warm)), key=lambda i: -warm[i][1])[: cfg.population]
        for i in sorted(best):  # age order
            self.members.append(list(warm[i][0]))
            self.rewards.append(warm[i][1])

    def _child(self) -> list[int]:
        if len(self.members) < self.cfg.population:  # the initial population: random archs
            tokens: list[int] = []
            for _ in self.space.tokens:
                tokens.append(int(self.rng.choice(np.flatnonzero(self.space.mask(tokens)))))
            return tokens
        picked = self.rng.choice(len(self.members), size=min(self.cfg.sample_size, len(self.members)), replace=False)
        parent = max(picked.tolist(), key=lambda i: self.rewards[i])  # ties: the first drawn
        return mutate(self.members[parent], self.space, self.rng)

    def sample(self, n: int) -> list[Sample]:
        out = []
        for _ in range(n):
            tokens = self._child()
            masks = np.stack([self.space.mask(tokens[:i]) for i in range(len(tokens))])
            out.append(Sample(self.space.decode(tokens), np.asarray(tokens, dtype=np.int64), masks, 0.0, 0.0))
        return out

    def update(self, samples: list[Sample], rewards: list[float]) -> dict[str, float]:
        """Each result joins the population as its youngest member; the oldest die."""
        if len(samples) != len(rewards) or not samples:
            raise ValueError(f"update needs one reward per sample, got {len(samples)} samples, {len(rewards)} rewards")
        for s, r in zip(samples, rewards, strict=True):
            self.members.append([int(t) for t in s.tokens])
            self.rewards.append(float(r))
        excess = max(0, len(self.members) - self.cfg.population)
        del self.members[:excess], self.rewards[:excess]
        return {"mean_reward": float(np.mean(rewards)), "population": float(len(self.members)), "population_best": max(self.rewards)}

    def state_dict(self) -> dict:
        return {
            "kind": "evolution",
            "head": self.space.head,
            "config": asdict(self.cfg),
            "members": [list(m) for m in self.members],
            "rewards": list(self.rewards),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        check_kind(state, "evolution", self.space.head)
        if state["config"] != asdict(self.cfg):
            raise ValueError(f"controller state is for evolution {state['config']}, not {asdict(self.cfg)} (search.population, search.sample_size)")
        self.members = [list(m) for m in state["members"]]
        self.rewards = list(state["rewards"])
        self.rng.bit_generator.state = state["rng"]
