"""The cost constraint (MnasNet-style hard constraint, beyond the paper; ``nasfcos.search.loop``'s
docstring): every drawn arch is costed, one over a limit gets its ``over_budget`` row once and
another is drawn in its place."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from nasfcos.arch import Arch
from nasfcos.search.failures import SearchHalted
from nasfcos.search.rows import over_budget_row
from nasfcos.search.sample import Sample

if TYPE_CHECKING:
    from nasfcos.search.config import Policy, Results, SearchConfig
    from nasfcos.search.state import SearchState

Cost = Callable[[Arch], tuple[int, int]]  # arch -> (decoder params, decoder MACs), e.g. nasfcos.model.complexity.decoder_cost
# A policy whose draws are over budget this many times per arch it is asked for stops the search.
MAX_REJECTS_PER_SAMPLE = 1000


class CostBudget:
    """The cost constraint of one search (module docstring): draws archs within it,
    writes each over-budget arch's row once."""

    def __init__(self, cfg: SearchConfig, cost: Cost | None, results: Results, over: set[str], state: SearchState) -> None:
        limited = cfg.max_decoder_params is not None or cfg.max_decoder_macs is not None
        if limited and cost is None:
            raise ValueError("search: max_decoder_params/max_decoder_macs are set but no cost function was given")
        self.cfg, self.cost, self.results, self.over, self.state = cfg, cost if limited else None, results, over, state

    def reason(self, arch: Arch) -> tuple[str, int, int]:
        """('' when within budget, else why not; params; MACs)."""
        params, macs = self.cost(arch)
        why = []
        if self.cfg.max_decoder_params is not None and params > self.cfg.max_decoder_params:
            why.append(f"decoder params {params:,} > search.max_decoder_params {self.cfg.max_decoder_params:,}")
        if self.cfg.max_decoder_macs is not None and macs > self.cfg.max_decoder_macs:
            why.append(f"decoder MACs {macs:,} > search.max_decoder_macs {self.cfg.max_decoder_macs:,}")
        return "; ".join(why), params, macs

    def draw(self, policy: Policy, n: int, *, step: int, first_sample: int) -> tuple[list[Sample], int]:
        """``n`` samples within budget and how many draws were rejected; a rejected arch
        not seen before gets its row (sample index ``first_sample + n + j``, j-th rejection)."""
        if self.cost is None:
            return policy.sample(n), 0
        out: list[Sample] = []
        rejected = 0
        while len(out) < n:
            for s in policy.sample(n - len(out)):
                why, params, macs = self.reason(s.arch)
                if not why:
                    out.append(s)
                    continue
                if s.arch.arch_id not in self.over:
                    row = over_budget_row(s.arch, params=params, macs=macs, reason=why, step=step, sample=first_sample + n + rejected, penalty=self.cfg.failure_penalty)
                    self.results.append([row])
                    self.over.add(s.arch.arch_id)
                rejected += 1
            if rejected > MAX_REJECTS_PER_SAMPLE * n:
                raise SearchHalted(
                    f"search stopped: {rejected} draws in a row were over the cost constraint for {len(out)} within it; raise search.max_decoder_macs / search.max_decoder_params"
                )
        self.state.rejected += rejected
        return out, rejected
