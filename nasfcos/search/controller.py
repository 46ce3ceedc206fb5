"""The paper's search policy: an LSTM controller trained with PPO (NAS-FCOS §3.3).

The controller predicts a searched decoder token by token (a
``nasfcos.arch.TokenSpace``: 7 FPN blocks, the head — 6 sequential ops or the
DAG's op0 and 5 blocks — and the sharing index). Each token is a categorical
over the choices that are valid after the tokens before it, so every sample is
a valid :class:`~nasfcos.arch.Arch`.

The paper gives no controller hyper-parameters; the defaults are those of the
segmentation NAS it follows (Nekrasov et al., its ref. [14]): a 2-layer LSTM
with hidden size 100, PPO clip 0.1, Adam lr 1e-4, reward baseline decay 0.95,
gradient norm clip 2.0. Two update schedules:

``batch`` (default, ours)
    one PPO update per batch of ``archs_per_step`` results, ``ppo_epochs`` (4)
    full-batch Adam steps on it; advantages against the baseline *before* the
    batch (a baseline that has seen a reward would shrink its own advantage),
    which then follows each reward in order; entropy bonus 1e-4.
``buffer``
    [14]'s schedule exactly (nas-segm-pytorch ``PPO`` + ``RolloutStorage``): the
    baseline follows the new result, which replaces the oldest of 100 entries
    (at first 100 placeholders, [14]'s zero-filled storage: tokens 0,
    log-probability 0, reward 0; their ratios are ~0, so their gradient is ~0 (with the
    loss reward 0 is above the baseline: a tiny push toward arch 0, which [14]'s positive rewards did not give),
    but their Adam steps still move the policy on momentum); then one shuffled
    pass of minibatch-1 Adam steps over all 100 entries, advantages against the
    baseline *after* this result, ratios against each entry's stored sampling
    log-probability, no entropy bonus. [14] samples one arch per update: with
    ``archs_per_step`` K > 1 the K results of one policy enter in turn.

``benchmarks/controller_schedule.py`` compares them on a toy reward at the paper's
scale: ``buffer`` learns faster per arch (at 700 archs it closes 0.66 of the
random->optimum gap, ``batch`` 0.33), but at the paper's 2,800-arch budget ``batch``
closes 0.98 and finds the optimum in every seed, with ~1/200 of the Adam steps and
~1/40 of the controller compute (``buffer``: ~0.8 s of one core per arch, ~1.4 s on a
loaded machine, which would bound a search feeding 64 slots). Those ``buffer`` figures
were measured before it matched [14] exactly (it then kept the entropy bonus and
trained only filled entries).

:func:`nasfcos.search.policies.build_policy` builds these and regularised evolution
(``nasfcos.search.evolution``), a strategy beyond the paper, with the same interface.

Letter legend: B sampled sequences, T tokens, A max choices per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from nasfcos import rng
from nasfcos.arch import DEFAULT_HEAD_SEARCH, TokenSpace, token_space
from nasfcos.rng import local_generator
from nasfcos.search.sample import Sample, check_kind

UPDATES = ("batch", "buffer")
STALE_CORRECTIONS = ("none", "decoupled")


@dataclass(frozen=True)
class ControllerConfig:
    hidden_size: int = 100
    num_layers: int = 2
    lr: float = 1e-4
    clip: float = 0.1
    entropy_coef: float | None = None  # None: the schedule's own, 1e-4 for batch (ours), 0 for buffer ([14])
    baseline_decay: float = 0.95
    ppo_epochs: int = 4
    max_grad_norm: float = 2.0
    init_range: float = 0.1
    update: str = "batch"  # see the module docstring and benchmarks/controller_schedule.py
    buffer_size: int = 100  # [14]: RolloutStorage(num_steps=100)
    buffer_minibatch: int = 1  # [14]: num_mini_batch=100 over 100 entries
    buffer_epochs: int = 1  # [14]: ppo_epoch=1
    stale_correction: str = "none"  # batch schedule: "decoupled" PPO for async mode's stale samples (PPOController.update)
    stale_weight_cap: float = 2.0  # decoupled: the importance weights are truncated here

    def __post_init__(self) -> None:
        if self.entropy_coef is None:
            object.__setattr__(self, "entropy_coef", 0.0 if self.update == "buffer" else 1e-4)
        if not 0 <= self.baseline_decay < 1:
            raise ValueError(f"controller config: baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if self.update not in UPDATES:
            raise ValueError(f"controller config: update {self.update!r} is not one of {UPDATES}")
        if self.stale_correction not in STALE_CORRECTIONS or self.stale_weight_cap <= 0:
            raise ValueError(f"controller config: stale_correction {self.stale_correction!r} must be one of {STALE_CORRECTIONS}, stale_weight_cap > 0")
        if min(self.ppo_epochs, self.hidden_size, self.num_layers, self.buffer_size, self.buffer_minibatch, self.buffer_epochs) < 1 or self.clip <= 0:
            raise ValueError(f"controller config: bad values {self}")


class LSTMPolicy(nn.Module):
    """LSTM over the token sequence: the input at step t embeds the choice made at
    t-1 (a learned start vector at t=0); a linear head per token gives logits,
    with invalid choices masked out.

    Not [14]'s network, which feeds each step the LSTM's own previous output (the
    sampled choices never reach the LSTM: independent categoricals), shares one op
    classifier across op tokens and masks nothing: here the FPN id masks depend on
    earlier choices, which the policy should see too."""

    def __init__(self, cfg: ControllerConfig, space: TokenSpace) -> None:
        super().__init__()
        self.space = space
        tokens = space.tokens
        self.num_tokens, self.max_choices = len(tokens), space.max_choices
        self.start = nn.Parameter(torch.zeros(1, cfg.hidden_size))
        offsets = np.cumsum([0] + [t.choices for t in tokens[:-1]])
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.long), persistent=False)
        # column of token t's choice a in the heads' outputs; padding -> an extra -inf column
        total = int(sum(t.choices for t in tokens))
        self.choices = [t.choices for t in tokens]
        cols = [[int(offsets[t]) + a if a < tok.choices else total for a in range(self.max_choices)] for t, tok in enumerate(tokens)]
        self.register_buffer("columns", torch.as_tensor(cols, dtype=torch.long), persistent=False)  # (T, A)
        self.embed = nn.Embedding(total, cfg.hidden_size)
        self.lstm = nn.LSTM(cfg.hidden_size, cfg.hidden_size, cfg.num_layers)
        # one linear layer holds every token's head (rows offsets[t] .. + choices): few
        # parameter tensors keep the buffer schedule's ~100 Adam steps per arch cheap
        self.heads = nn.Linear(cfg.hidden_size, total)
        for p in self.parameters():
            nn.init.uniform_(p, -cfg.init_range, cfg.init_range)

    def _logits(self, t: int, out: Tensor, mask: Tensor) -> Tensor:
        logits = torch.full((out.shape[0], self.max_choices), float("-inf"), device=out.device)
        a, n = int(self.offsets[t]), self.choices[t]
        logits[:, :n] = nn.functional.linear(out, self.heads.weight[a : a + n], self.heads.bias[a : a + n])
        return logits.masked_fill(~mask, float("-inf"))  # (B, A)

    def _input(self, t: int, prev: Tensor | None, batch: int) -> Tensor:
        if t == 0:
            return self.start.expand(batch, -1)
        return self.embed(prev + self.offsets[t - 1])

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> list[Sample]:
        """``n`` sequences, token by token. Log-probability and entropy are summed by
        :meth:`score` afterwards (one pass, as in training), so the token loop holds only
        what sampling needs: few small ops, since in a search each op hands the GIL to
        the flow's other threads and may wait a switch interval to get it back."""
        state, prev = None, None
        prefixes: list[list[int]] = [[] for _ in range(n)]
        masks = []
        for t in range(self.num_tokens):
            out, state = self.lstm(self._input(t, prev, n)[None], state)
            mask = np.stack([self.space.mask(p) for p in prefixes])  # (B, A)
            probs = torch.softmax(self._logits(t, out[0], torch.from_numpy(mask)), dim=-1)
            choice = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
            masks.append(mask)
            for p, c in zip(prefixes, choice.tolist(), strict=True):
                p.append(c)
            prev = choice
        tokens, masks_arr = np.asarray(prefixes, dtype=np.int64), np.stack(masks, axis=1)  # (B, T), (B, T, A)
        logps, ents = self.score(torch.from_numpy(tokens), torch.from_numpy(masks_arr))
        return [Sample(self.space.decode(p), tokens[i], masks_arr[i], float(logps[i]), float(ents[i])) for i, p in enumerate(prefixes)]

    def score(self, tokens: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probability and entropy (B,) of given sequences (B, T) with masks (B, T, A).

        Teacher forcing: the inputs are known, so one LSTM call covers all T steps,
        and one matmul with the concatenated token heads gives every token's logits
        (the buffer schedule calls this ~100 times per arch).
        """
        B, T = tokens.shape
        prev = self.embed(tokens[:, :-1] + self.offsets[None, :-1])  # (B, T-1, H): choice t-1 feeds step t
        inputs = torch.cat([self.start.expand(B, -1)[:, None], prev], dim=1).transpose(0, 1)  # (T, B, H)
        out, _ = self.lstm(inputs)  # (T, B, H)
        every = self.heads(out)  # (T, B, sum choices)
        every = torch.cat([every, every.new_full((T, B, 1), float("-inf"))], dim=2)
        logits = every.gather(2, self.columns[:, None, :].expand(T, B, -1)).transpose(0, 1)  # (B, T, A)
        logits = logits.masked_fill(~masks, float("-inf"))
        logp_all = torch.log_softmax(logits, dim=-1)
        p_all = logp_all.exp()
        logp = logp_all.gather(2, tokens[..., None]).squeeze(2).sum(1)  # (B,)
        ent = -(p_all * logp_all.masked_fill(~masks, 0.0)).sum((1, 2))
        return logp, ent


class PPOController:
    """LSTM policy + PPO: clipped ratio, entropy bonus, moving-average baseline;
    ``cfg.update`` picks the batch or [14]'s rollout-buffer schedule."""

    def __init__(self, cfg: ControllerConfig = ControllerConfig(), *, seed: int = 0, head: str = DEFAULT_HEAD_SEARCH) -> None:
        self.cfg = cfg
        self.space = token_space(head)
        with local_generator(rng.generator(seed)):  # its init stream, not the process's
            self.policy = LSTMPolicy(cfg, self.space)
        # foreach: one fused update over the few parameter tensors (the buffer schedule makes ~100 steps per arch)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr, foreach=True)
        self.generator = torch.Generator().manual_seed(seed)
        self.baseline: float | None = None
        # [14]'s rollout buffer (buffer schedule only): the newest buffer_size results,
        # placeholders until there are that many (module docstring)
        self.buffer = self._placeholders(cfg.buffer_size if cfg.update == "buffer" else 0)

    def sample(self, n: int) -> list[Sample]:
        return self.policy.sample(n, self.generator)

    def _placeholders(self, n: int) -> dict[str, Tensor]:
        """``n`` entries of [14]'s zero-filled rollout storage: reward 0, log-probability 0,
        tokens 0 (the first valid choice, where a restricted ``ops`` forbids choice 0)."""
        prefix: list[int] = []
        masks = []
        for _ in self.space.tokens:
            masks.append(self.space.mask(prefix))
            prefix.append(int(masks[-1].argmax()))
        return {
            "tokens": torch.as_tensor(prefix, dtype=torch.long).repeat(n, 1),
            "masks": torch.as_tensor(np.stack(masks)).repeat(n, 1, 1),
            "logp": torch.zeros(n),
            "reward": torch.zeros(n),
        }

    def update(self, samples: list[Sample], rewards: list[float]) -> dict[str, float]:
        """PPO on sampled archs and their rewards (one batch update, or one buffer
        update per sample in order, see the module docstring).

        ``stale_correction="decoupled"`` (batch schedule; decoupled PPO, Hilton et al. 2022):
        a sample drawn by an older policy (async mode: learned several updates after it
        was drawn) is clipped around the policy at this update instead of its sampling
        policy, and its advantage is weighted by the ratio of the two, truncated at
        ``stale_weight_cap``. Plain PPO zeroes such a sample's gradient once the policy has
        moved past the clip band since, and slow archs are the stalest
        (``benchmarks/staleness.py``). A fresh sample (sync mode, one slot) gets exactly
        the plain update. Measured there (toy reward, 1,400 archs, 64 simulated slots): async
        closes 0.74-0.79 of the gap a 1-slot search closes with it, 0.41-0.44 without (16
        slots: 0.95-0.96 against 0.71). Off by default: async's small lean against slow archs
        at equal progress stays (their results arrive later; the clip is not its cause)."""
        if len(samples) != len(rewards) or not samples:
            raise ValueError(f"update needs one reward per sample, got {len(samples)} samples, {len(rewards)} rewards")
        if self.cfg.update == "buffer":
            stats: dict[str, float] = {}
            for s, v in zip(samples, rewards, strict=True):
                stats = self._buffer_update(s, float(v))
            return {**stats, "mean_reward": float(np.mean(rewards))}
        r = torch.tensor(rewards, dtype=torch.float32)
        baseline = float(r.mean()) if self.baseline is None else self.baseline
        adv = r - baseline
        for v in rewards:  # the baseline follows every reward, in order
            baseline = self.cfg.baseline_decay * baseline + (1 - self.cfg.baseline_decay) * v
        self.baseline = baseline
        tokens = torch.as_tensor(np.stack([s.tokens for s in samples]), dtype=torch.long)
        masks = torch.as_tensor(np.stack([s.masks for s in samples]))
        old = torch.tensor([s.logp for s in samples])
        weight = torch.ones(len(samples))
        if self.cfg.stale_correction == "decoupled":
            with torch.no_grad():
                now, _ = self.policy.score(tokens, masks)
            stale = (now - old).abs() > 1e-4  # beyond the rounding between sampling and scoring
            weight = torch.where(stale, torch.exp(now - old).clamp(max=self.cfg.stale_weight_cap), weight)
            old = torch.where(stale, now, old)
        stats = {}
        for _ in range(self.cfg.ppo_epochs):
            stats = self._ppo_step(tokens, masks, old, adv * weight)
        return {**stats, "baseline": baseline, "mean_reward": float(r.mean()), "mean_advantage": float(adv.mean())}

    def _ppo_step(self, tokens: Tensor, masks: Tensor, old_logp: Tensor, adv: Tensor) -> dict[str, float]:
        """One Adam step on the clipped surrogate (minus the entropy bonus)."""
        logp, ent = self.policy.score(tokens, masks)
        ratio = torch.exp(logp - old_logp)
        surr = torch.min(ratio * adv, ratio.clamp(1 - self.cfg.clip, 1 + self.cfg.clip) * adv)
        loss = -surr.mean() - self.cfg.entropy_coef * ent.mean()
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm, foreach=True)
        self.optimizer.step()
        return {"loss": loss.item(), "entropy": ent.mean().item(), "ratio": ratio.mean().item()}

    def _buffer_update(self, sample: Sample, reward: float) -> dict[str, float]:
        """[14]: baseline follows the reward, the result enters the buffer (oldest out),
        then ``buffer_epochs`` shuffled passes of ``buffer_minibatch``-sized Adam steps over
        every entry, placeholders included."""
        self.baseline = reward if self.baseline is None else self.cfg.baseline_decay * self.baseline + (1 - self.cfg.baseline_decay) * reward
        new = {
            "tokens": torch.as_tensor(sample.tokens, dtype=torch.long)[None],
            "masks": torch.as_tensor(sample.masks)[None],
            "logp": torch.tensor([sample.logp]),
            "reward": torch.tensor([reward]),
        }
        self.buffer = {k: torch.cat([self.buffer[k], new[k]])[-self.cfg.buffer_size :] for k in self.buffer}
        adv = self.buffer["reward"] - self.baseline
        n, mb = len(adv), self.cfg.buffer_minibatch
        stats: dict[str, float] = {}
        for _ in range(self.cfg.buffer_epochs):
            order = torch.randperm(n, generator=self.generator)
            for i in range(0, n, mb):
                idx = order[i : i + mb]
                stats = self._ppo_step(self.buffer["tokens"][idx], self.buffer["masks"][idx], self.buffer["logp"][idx], adv[idx])
        return {**stats, "baseline": self.baseline, "mean_advantage": float(adv.mean())}

    def state_dict(self) -> dict:
        return {
            "kind": "ppo",
            "head": self.space.head,
            "config": asdict(self.cfg),
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "baseline": self.baseline,
            "buffer": dict(self.buffer),
        }

    def load_state_dict(self, state: dict) -> None:
        check_kind(state, "ppo", self.space.head)
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.baseline = state["baseline"]
        if "buffer" in state:
            buffer = dict(state["buffer"])
            # a buffer saved before the placeholders: topped up, oldest first
            missing = self.cfg.buffer_size - len(buffer["reward"]) if self.cfg.update == "buffer" else 0
            self.buffer = {k: torch.cat([v, buffer[k]]) for k, v in self._placeholders(max(missing, 0)).items()}
