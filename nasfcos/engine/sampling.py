"""Seeded sampling: which sample and which augmentation seed each training position gets,
as a function of (seed, position), so a resumed or data-parallel run sees the same batches."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

from nasfcos import rng
from nasfcos.rng import local_generator


class PositionSampler(Sampler):
    """Batches of (dataset index, augmentation seed) for iterations [start, end).

    Sample position g = it * batch + j walks an endless sequence of seeded
    permutations (one per epoch), so any iteration's batch can be produced
    without replaying the ones before it. With ``world_size`` N, rank r takes the
    r-th contiguous share (batch / N positions) of every global batch: the ranks'
    shares, concatenated in rank order, are the one-process batch.
    """

    def __init__(self, n: int, *, batch_size: int, start: int, end: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n == 0:
            raise ValueError("training dataset is empty")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.n, self.batch_size, self.start, self.end, self.seed = n, batch_size, start, end, seed
        self.share, self.offset = batch_size // world_size, rank * (batch_size // world_size)
        self._perms: dict[int, torch.Tensor] = {}

    def _index(self, g: int) -> int:
        epoch, pos = divmod(g, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))}
        return int(self._perms[epoch][pos])

    def __iter__(self):
        for it in range(self.start, self.end):
            g0 = it * self.batch_size + self.offset
            yield [(self._index(g), self.seed * 1_000_003 + g) for g in range(g0, g0 + self.share)]

    def __len__(self) -> int:
        return self.end - self.start


class SeededSamples(Dataset):
    """Loads sample ``idx`` with its random transforms drawing from a generator seeded for
    its position, so they are reproducible whatever the worker count, the resume point or
    the other threads of the process draw."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        idx, seed = key
        with local_generator(rng.generator(seed)):
            return self.dataset[idx]
