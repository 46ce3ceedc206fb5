"""The controller's stale-sample correction (``stale_correction="decoupled"``, issue #25 item 6):
fresh samples get exactly the plain PPO update; a stale one keeps its gradient where plain
PPO's clip zeroes it, weighted by its truncated importance ratio."""

import math

import pytest
import torch

from nasfcos.search.controller import ControllerConfig, PPOController


def _params(c: PPOController) -> list[torch.Tensor]:
    return [p.detach().clone() for p in c.policy.parameters()]


def test_fresh_samples_get_the_plain_update():
    """Sync mode and one slot: every sample is from the current policy, so the correction is
    a no-op, bit for bit (searches without staleness stay as they were)."""
    torch.set_num_threads(1)
    plain, fixed = PPOController(seed=4), PPOController(ControllerConfig(stale_correction="decoupled"), seed=4)
    for _ in range(2):
        a, b = plain.sample(8), fixed.sample(8)
        assert [str(s.arch) for s in a] == [str(s.arch) for s in b]
        rewards = [-2.3 + 0.01 * i for i in range(8)]
        plain.update(a, rewards)
        fixed.update(b, rewards)
    assert all(torch.equal(p, q) for p, q in zip(_params(plain), _params(fixed), strict=True))


@pytest.mark.parametrize(("moved", "weight"), [(1.5, 1.5), (5.0, 2.0)])
def test_a_stale_sample_keeps_its_gradient(moved, weight):
    """A good arch the policy has moved towards since it was drawn (ratio ``moved`` > 1 + clip):
    plain PPO's clip zeroes its gradient, so the update leaves the policy as it was; decoupled
    PPO clips around the current policy and weights the advantage by the ratio, truncated at
    ``stale_weight_cap`` (2)."""
    torch.set_num_threads(1)
    moves = {}
    for correction in ("none", "decoupled"):
        c = PPOController(ControllerConfig(stale_correction=correction, entropy_coef=0.0), seed=1)
        (s,) = c.sample(1)
        s.logp -= math.log(moved)  # as if drawn by an older policy that gave it 1/moved of today's probability
        c.baseline = -2.5
        seen = []
        step = c._ppo_step
        c._ppo_step = lambda tokens, masks, old, adv, step=step, seen=seen: (seen.append(adv.clone()), step(tokens, masks, old, adv))[1]
        before = _params(c)
        c.update([s], [-2.2])
        moves[correction] = sum(float((p - q).abs().sum()) for p, q in zip(_params(c), before, strict=True))
        assert float(seen[0][0]) == pytest.approx(0.3 * (weight if correction == "decoupled" else 1.0), rel=1e-4)
    assert moves["none"] == 0.0
    assert moves["decoupled"] > 0.0


def test_config_validates_the_correction():
    with pytest.raises(ValueError, match="stale_correction"):
        ControllerConfig(stale_correction="sometimes")
    with pytest.raises(ValueError, match="stale_weight_cap"):
        ControllerConfig(stale_correction="decoupled", stale_weight_cap=0.0)
