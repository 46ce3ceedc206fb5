"""Local random streams: every random draw of a task comes from a generator seeded for it.

torch's default generator is one per process, and anything in the process can draw from it
(another device slot's thread, a DataLoader starting, a library), so a stream seeded on it
is only reproducible if nothing else runs. ``local_generator(g)`` instead routes the random
torch calls made *by this thread* inside the block to ``g``: model constructors (whose
``reset_parameters`` take no generator) and random transforms draw from ``g`` and never
touch, or see, the global generator. It works through a torch function mode, which torch
keeps per thread, so concurrent blocks in other threads are unaffected.

``stream(seed, *keys)`` derives the seed of a keyed stream (the DataLoaders' base seeds)
from the run's seed. The main streams keep ``seed`` itself, the numbers runs made before
these generators existed: each stage's init (finetune, full training and every proxy decoder
start from ``seed``: the same init for every arch is the proxy's common random numbers), the
proxy's batch order and the controller's init and sampling each on a generator of their own.
"""

from __future__ import annotations

import hashlib

import torch
from torch.overrides import TorchFunctionMode

# Random torch calls that take a ``generator`` keyword but may be called without it. Calls
# that pass ``generator=None`` by name (``torch.nn.init``'s, as torch dispatches them) are
# caught by that keyword.
_RANDOM_CALLS = frozenset(
    [
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        torch.Tensor.random_,
        torch.Tensor.bernoulli_,
        torch.Tensor.exponential_,
        torch.Tensor.geometric_,
        torch.Tensor.cauchy_,
        torch.Tensor.log_normal_,
        torch.Tensor.bernoulli,
        torch.rand,
        torch.randn,
        torch.randint,
        torch.randperm,
        torch.normal,
        torch.bernoulli,
        torch.multinomial,
        torch.poisson,
    ]
)


def _device_type(args, kwargs) -> str:
    """The device the call draws on: its first tensor's, or a factory's ``device`` (CPU by default)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    device = kwargs.get("device")
    return torch.device(device).type if device is not None else "cpu"


class local_generator(TorchFunctionMode):
    """``with local_generator(g):`` the random torch calls of this thread on ``g``'s device
    type that name no generator draw from ``g`` instead of the global generator."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        random = func in _RANDOM_CALLS or "generator" in kwargs
        if random and kwargs.get("generator") is None and _device_type(args, kwargs) == self.generator.device.type:
            kwargs["generator"] = self.generator
        return func(*args, **kwargs)


def stream(seed: int, *keys: object) -> int:
    """A 63-bit seed for the stream named by ``keys`` under the run's ``seed``; with no keys
    it is ``seed`` itself, so a stage's main stream keeps the numbers of ``manual_seed(seed)``."""
    if not keys:
        return int(seed)
    text = "\x1f".join([str(int(seed)), *map(str, keys)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``stream(seed, *keys)``."""
    return torch.Generator(device=device).manual_seed(stream(seed, *keys))
