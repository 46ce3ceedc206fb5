"""Backbone features at the proxy geometry, computed once for the search (NAS-FCOS §4.1).

"We pre-compute the backbone features with input images resized to short size
384 then randomly cropped to 384 x 384. Target object sizes of interest are
scaled correspondingly." The VOC training set is split at random into a
meta-train set of 4,000 images and a meta-val set of 1,715 (VOC2012's train split
has 5,717 images; the paper's count is 5,715).

This module produces plain numpy arrays per shard of samples; writing them
durably (and resuming) is ``storage.features``'s job.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nasfcos import rng
from nasfcos.data.transforms import build_transforms, collate
from nasfcos.engine.sampling import SeededSamples
from nasfcos.model.backbones import LEVELS

PROXY_SIZE = 384


def meta_split(n: int, *, train_size: int = 4000, val_size: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``n`` dataset indices into meta-train (``train_size``)
    and meta-val (``val_size``, default: all the rest)."""
    if train_size < 1 or train_size >= n:
        raise ValueError(f"meta-train size {train_size} must be in 1..{n - 1} for a dataset of {n} images")
    rest = n - train_size
    val_size = rest if val_size is None else val_size
    if not 1 <= val_size <= rest:
        raise ValueError(f"meta-val size {val_size} must be in 1..{rest} (dataset {n}, meta-train {train_size})")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:train_size]), np.sort(perm[train_size : train_size + val_size])


def fit_split(n: int, train_size: int = 4000, val_size: int | None = None) -> tuple[int, int]:
    """(meta-train, meta-val) sizes for a dataset of ``n`` images: the requested sizes
    when they fit (``val_size`` None: all the rest), else both scaled down to ``n`` in the
    requested proportion (``val_size`` None and no rest left: the paper's 4000:1715).

    >>> fit_split(5715, 4000, 1715), fit_split(100, 4000, 1715), fit_split(100, 4000)
    ((4000, 1715), (70, 30), (70, 30))
    """
    if n < 2:
        raise ValueError(f"a meta-train/meta-val split needs at least 2 images, got {n}")
    if val_size is None:
        if train_size < n:
            return train_size, n - train_size
        val_size = train_size * 1715 / 4000
    if train_size + val_size <= n:
        return train_size, int(val_size)
    train = min(n - 1, max(1, round(n * train_size / (train_size + val_size))))
    return train, n - train


def proxy_transforms(size: int = PROXY_SIZE):
    """Short side ``size`` (no long-side cap), random ``size`` x ``size`` crop, normalise."""
    return build_transforms(train=False, min_size=size, max_size=None, crop=size, flip=False)


class FeatureComputer:
    """``compute(start, stop)`` for samples ``indices[start:stop]`` of ``dataset``:
    C2..C5 as float16 plus crop, scale, boxes and labels (ignored boxes dropped:
    they are not training targets). Each sample's crop is drawn from
    ``seed`` and its dataset index, so any shard is reproducible on its own."""

    def __init__(
        self,
        backbone: nn.Module,
        dataset: Dataset,
        indices: np.ndarray,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        self.backbone = backbone.to(device).eval()
        self.dataset = dataset
        self.indices = np.asarray(indices)
        self.seed = seed
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.num_workers = num_workers

    @torch.no_grad()
    def __call__(self, start: int, stop: int) -> dict:
        keys = [(int(i), self.seed * 1_000_003 + int(i)) for i in self.indices[start:stop]]
        loader = DataLoader(
            SeededSamples(self.dataset),
            batch_size=self.batch_size,
            sampler=keys,
            generator=rng.generator(self.seed, "loader"),  # its worker base seed, else a draw from the global generator
            num_workers=self.num_workers,
            collate_fn=collate,
        )
        feats: dict[str, list[np.ndarray]] = {k: [] for k in LEVELS}
        targets: list[dict] = []
        for images, batch_targets in loader:
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
                maps = self.backbone(images.to(self.device))
            for k, m in zip(LEVELS, maps, strict=True):
                feats[k].append(m.to(torch.float16).cpu().numpy())  # (B, C, H, W)
            targets += batch_targets
        keep = [~t["ignore"] for t in targets]
        return {
            "features": {k: np.concatenate(v) for k, v in feats.items()},
            "image_id": np.array([t["image_id"] for t in targets], dtype=np.int64),
            "crop": np.stack([t["crop"].numpy() for t in targets]).astype(np.int32),
            "scale": np.stack([t["scale"].numpy() for t in targets]).astype(np.float32),
            "boxes": [t["boxes"][k].numpy().astype(np.float32).reshape(-1, 4) for t, k in zip(targets, keep, strict=True)],
            "labels": [t["labels"][k].numpy().astype(np.int64) for t, k in zip(targets, keep, strict=True)],
        }
