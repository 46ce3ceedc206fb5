"""The search policy: an LSTM controller trained with PPO, and a random baseline (NAS-FCOS §3.3).

The controller predicts a searched decoder token by token (``nasfcos.space.TOKEN_SPACE``:
7 FPN blocks, the head's first op and 5 blocks, the sharing index). Each token
is a categorical over the choices that are valid after the tokens before it,
so every sample is a valid :class:`~nasfcos.space.Arch`.

The paper gives no controller hyper-parameters; the defaults are those of the
segmentation NAS it follows (Nekrasov et al., its ref. [14]): a 2-layer LSTM
with hidden size 100, PPO clip 0.1, Adam lr 1e-4, reward baseline decay 0.95,
gradient norm clip 2.0. The number of PPO epochs per batch (4) and the entropy
bonus (1e-4) are ours.

Letter legend: B sampled sequences, T tokens, A max choices per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from nasfcos.space import TOKEN_SPACE, Arch


@dataclass(frozen=True)
class ControllerConfig:
    hidden_size: int = 100
    num_layers: int = 2
    lr: float = 1e-4
    clip: float = 0.1
    entropy_coef: float = 1e-4
    baseline_decay: float = 0.95
    ppo_epochs: int = 4
    max_grad_norm: float = 2.0
    init_range: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.baseline_decay < 1:
            raise ValueError(f"controller config: baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if self.clip <= 0 or self.ppo_epochs < 1 or self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError(f"controller config: bad values {self}")


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


def _sample_masks(prefixes: list[list[int]]) -> np.ndarray:
    return np.stack([TOKEN_SPACE.mask(p) for p in prefixes])  # (B, A)


class LSTMPolicy(nn.Module):
    """LSTM over the token sequence: the input at step t embeds the choice made at
    t-1 (a learned start vector at t=0); a linear head per token gives logits,
    with invalid choices masked out."""

    def __init__(self, cfg: ControllerConfig) -> None:
        super().__init__()
        tokens = TOKEN_SPACE.tokens
        self.num_tokens, self.max_choices = len(tokens), TOKEN_SPACE.max_choices
        self.start = nn.Parameter(torch.zeros(1, cfg.hidden_size))
        offsets = np.cumsum([0] + [t.choices for t in tokens[:-1]])
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.long), persistent=False)
        self.embed = nn.Embedding(int(sum(t.choices for t in tokens)), cfg.hidden_size)
        self.lstm = nn.LSTM(cfg.hidden_size, cfg.hidden_size, cfg.num_layers)
        self.heads = nn.ModuleList(nn.Linear(cfg.hidden_size, t.choices) for t in tokens)
        for p in self.parameters():
            nn.init.uniform_(p, -cfg.init_range, cfg.init_range)

    def _logits(self, t: int, out: Tensor, mask: Tensor) -> Tensor:
        logits = torch.full((out.shape[0], self.max_choices), float("-inf"), device=out.device)
        logits[:, : self.heads[t].out_features] = self.heads[t](out)
        return logits.masked_fill(~mask, float("-inf"))  # (B, A)

    def _input(self, t: int, prev: Tensor | None, batch: int) -> Tensor:
        if t == 0:
            return self.start.expand(batch, -1)
        return self.embed(prev + self.offsets[t - 1])

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> list[Sample]:
        state, prev = None, None
        prefixes: list[list[int]] = [[] for _ in range(n)]
        masks, logps, ents = [], torch.zeros(n), torch.zeros(n)
        for t in range(self.num_tokens):
            out, state = self.lstm(self._input(t, prev, n)[None], state)
            mask = torch.as_tensor(_sample_masks(prefixes))
            dist = torch.distributions.Categorical(logits=self._logits(t, out[0], mask))
            choice = torch.multinomial(dist.probs, 1, generator=generator).squeeze(1)  # (B,)
            logps += dist.log_prob(choice)
            ents += dist.entropy()
            masks.append(mask.numpy())
            for p, c in zip(prefixes, choice.tolist()):
                p.append(c)
            prev = choice
        masks_arr = np.stack(masks, axis=1)  # (B, T, A)
        return [
            Sample(Arch.from_tokens(p), np.asarray(p), masks_arr[i], float(logps[i]), float(ents[i]))
            for i, p in enumerate(prefixes)
        ]

    def score(self, tokens: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probability and entropy (B,) of given sequences (B, T) with masks (B, T, A).

        Teacher forcing: the inputs are known, so one LSTM call covers all T steps.
        """
        B, T = tokens.shape
        prev = self.embed(tokens[:, :-1] + self.offsets[None, :-1])  # (B, T-1, H): choice t-1 feeds step t
        inputs = torch.cat([self.start.expand(B, -1)[:, None], prev], dim=1).transpose(0, 1)  # (T, B, H)
        out, _ = self.lstm(inputs)  # (T, B, H)
        logits = torch.stack([self._logits(t, out[t], masks[:, t]) for t in range(T)], dim=1)  # (B, T, A)
        logp_all = torch.log_softmax(logits, dim=-1)
        p_all = logp_all.exp()
        logp = logp_all.gather(2, tokens[..., None]).squeeze(2).sum(1)  # (B,)
        ent = -(p_all * logp_all.masked_fill(~masks, 0.0)).sum((1, 2))
        return logp, ent


class PPOController:
    """LSTM policy + PPO: clipped ratio, entropy bonus, moving-average baseline."""

    def __init__(self, cfg: ControllerConfig = ControllerConfig(), *, seed: int = 0) -> None:
        self.cfg = cfg
        torch.manual_seed(seed)
        self.policy = LSTMPolicy(cfg)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.baseline: float | None = None

    def sample(self, n: int) -> list[Sample]:
        return self.policy.sample(n, self.generator)

    def update(self, samples: list[Sample], rewards: list[float]) -> dict[str, float]:
        """One PPO update on a batch of sampled archs and their rewards."""
        if len(samples) != len(rewards) or not samples:
            raise ValueError(f"update needs one reward per sample, got {len(samples)} samples, {len(rewards)} rewards")
        r = torch.tensor(rewards, dtype=torch.float32)
        baseline = float(r.mean()) if self.baseline is None else self.baseline
        adv = r - baseline
        for v in rewards:  # the baseline follows every reward, in order
            baseline = self.cfg.baseline_decay * baseline + (1 - self.cfg.baseline_decay) * v
        self.baseline = baseline
        tokens = torch.as_tensor(np.stack([s.tokens for s in samples]), dtype=torch.long)
        masks = torch.as_tensor(np.stack([s.masks for s in samples]))
        old = torch.tensor([s.logp for s in samples])
        stats = {}
        for _ in range(self.cfg.ppo_epochs):
            logp, ent = self.policy.score(tokens, masks)
            ratio = torch.exp(logp - old)
            surr = torch.min(ratio * adv, ratio.clamp(1 - self.cfg.clip, 1 + self.cfg.clip) * adv)
            loss = -surr.mean() - self.cfg.entropy_coef * ent.mean()
            self.optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            stats = {"loss": loss.item(), "entropy": ent.mean().item(), "ratio": ratio.mean().item()}
        return {**stats, "baseline": baseline, "mean_reward": float(r.mean()), "mean_advantage": float(adv.mean())}

    def state_dict(self) -> dict:
        return {
            "kind": "ppo",
            "config": asdict(self.cfg),
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "baseline": self.baseline,
        }

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, "ppo")
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.baseline = state["baseline"]


class RandomPolicy:
    """Uniform choice among the valid tokens: the random-search baseline, with
    the controller's interface (``update`` learns nothing)."""

    def __init__(self, *, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> list[Sample]:
        out = []
        for _ in range(n):
            tokens, masks = [], []
            for _ in TOKEN_SPACE.tokens:
                m = TOKEN_SPACE.mask(tokens)
                masks.append(m)
                tokens.append(int(self.rng.choice(np.flatnonzero(m))))
            logp = -float(sum(np.log(m.sum()) for m in masks))
            out.append(Sample(Arch.from_tokens(tokens), np.asarray(tokens), np.stack(masks), logp, -logp))
        return out

    def update(self, samples: list[Sample], rewards: list[float]) -> dict[str, float]:
        return {"mean_reward": float(np.mean(rewards))} if rewards else {}

    def state_dict(self) -> dict:
        return {"kind": "random", "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, "random")
        self.rng.bit_generator.state = state["rng"]


def _check_kind(state: dict, kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"controller state is for a {state.get('kind')!r} policy, not {kind!r}")


def build_policy(kind: str, *, seed: int = 0, config: ControllerConfig | None = None) -> PPOController | RandomPolicy:
    if kind == "ppo":
        return PPOController(config or ControllerConfig(), seed=seed)
    if kind == "random":
        return RandomPolicy(seed=seed)
    raise ValueError(f"unknown policy {kind!r}; known: ppo, random")
