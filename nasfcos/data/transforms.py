"""Joint image/box transforms and batching for FCOS training and evaluation.

Legend: N images, M boxes of one image, H/W image height/width, Hp/Wp padded batch size.

Every transform is a callable ``(image [3, H, W], target) -> (image, target)``; boxes are
float32 x1y1x2y2 in the current image's pixels. Randomness only comes from torch's random
calls, which the loader routes to a generator seeded per sample position
(``nasfcos.engine.sampling.SeededSamples``), so runs repeat whatever else the process draws.
The bookkeeping keys let predictions be mapped back to the original image:
``original_box = (box + [x0, y0, x0, y0]) / [sx, sy, sx, sy]`` with ``crop`` and ``scale``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from nasfcos.data.common import Target, Transforms

# torchvision's ImageNet weights were trained on inputs normalised with these.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Per-box entries that must stay aligned with ``boxes`` when boxes are dropped.
_PER_BOX_KEYS = ("boxes", "labels", "ignore")


def _check_image(image: Tensor, where: str) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"{where}: expected an image of shape (3, H, W), got {tuple(image.shape)}")


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transforms]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


def resized_hw(height: int, width: int, min_size: int, max_size: float | None) -> tuple[int, int]:
    """FCOS/maskrcnn-benchmark size rule: short side → ``min_size`` unless long side > ``max_size``.

    The rounding (``round`` for the capped short side, ``int`` for the long side) is the
    reference's, so image sizes — and thus feature-map sizes — match it exactly.
    """
    size = float(min_size)
    short, long = float(min(height, width)), float(max(height, width))
    if max_size is not None and long / short * size > max_size:
        size = float(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), int(size)
    return int(size), int(size * width / height)


class Resize:
    """Keep-aspect resize (FCOS rule); ``min_size`` as a tuple picks one at random (multi-scale).

    Boxes are scaled by the actual ``new/old`` ratios and ``target["scale"] = [sy, sx]``
    accumulates them relative to the original image.
    """

    def __init__(self, min_size: int | Sequence[int] = 800, max_size: float | None = 1333) -> None:
        sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        if not sizes or any(int(s) != s or s <= 0 for s in sizes):
            raise ValueError(f"Resize: min_size must be positive integers, got {min_size!r}")
        if max_size is not None and max_size <= 0:
            raise ValueError(f"Resize: max_size must be positive or None, got {max_size!r}")
        self.min_sizes = tuple(int(s) for s in sizes)
        self.max_size = max_size

    def __repr__(self) -> str:
        return f"Resize(min_size={self.min_sizes}, max_size={self.max_size})"

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        _check_image(image, "Resize")
        _, h, w = image.shape
        if len(self.min_sizes) == 1:
            min_size = self.min_sizes[0]
        else:
            min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()).item())]
        new_h, new_w = resized_hw(h, w, min_size, self.max_size)
        if (new_h, new_w) != (h, w):
            # antialias: the proxy task downsamples a lot, aliasing would hurt small objects.
            image = TF.resize(image, [new_h, new_w], antialias=True)
        sy, sx = new_h / h, new_w / w
        target = dict(target)
        target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)  # (M, 4)
        prior = target.get("scale", torch.ones(2, dtype=torch.float32))
        target["scale"] = prior * torch.tensor([sy, sx], dtype=torch.float32)
        return image, target


class RandomHorizontalFlip:
    """Mirror the image and boxes left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        _check_image(image, "RandomHorizontalFlip")
        # Always draw, so the RNG stream does not depend on p.
        if torch.rand(()).item() >= self.p:
            return image, target
        w = image.shape[-1]
        target = dict(target)
        x1, y1, x2, y2 = target["boxes"].unbind(-1)
        target["boxes"] = torch.stack([w - x2, y1, w - x1, y2], dim=-1)  # (M, 4)
        return image.flip(-1), target


class RandomCrop:
    """Random ``size``×``size`` window (or the whole side where the image is smaller).

    Boxes are shifted and clipped to the window; those left with width or height <= 0 are
    dropped with their labels/ignore flags. ``target["crop"] = [x0, y0, x1, y1]`` is the
    window in pre-crop pixels.
    """

    def __init__(self, size: int | tuple[int, int]) -> None:
        crop_h, crop_w = (size, size) if isinstance(size, int) else tuple(size)
        if crop_h <= 0 or crop_w <= 0:
            raise ValueError(f"RandomCrop: size must be positive, got {size!r}")
        self.size = (int(crop_h), int(crop_w))

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size})"

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        _check_image(image, "RandomCrop")
        _, h, w = image.shape
        crop_h, crop_w = min(self.size[0], h), min(self.size[1], w)
        y0 = int(torch.randint(h - crop_h + 1, ()).item())
        x0 = int(torch.randint(w - crop_w + 1, ()).item())
        image = image[:, y0 : y0 + crop_h, x0 : x0 + crop_w]

        target = dict(target)
        boxes = target["boxes"] - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, crop_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, crop_h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # (M,)
        target["boxes"] = boxes
        for key in _PER_BOX_KEYS:
            if key in target:
                target[key] = target[key][keep]
        target["crop"] = torch.tensor([x0, y0, x0 + crop_w, y0 + crop_h], dtype=torch.int64)
        return image, target


class Normalize:
    """uint8 → float32 in [0, 1] (float input is taken as already in [0, 1]), then ``(x - mean) / std``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"Normalize: need 3 means and 3 positive stds, got mean={mean!r} std={std!r}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        _check_image(image, "Normalize")
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std, target


def collate(batch: Sequence[tuple[Tensor, Target]], size_divisible: int = 32) -> tuple[Tensor, list[Target]]:
    """Stack images into one zero-padded batch (bottom/right) with sides a multiple of ``size_divisible``.

    The backbone's stride-32 level needs sides divisible by 32 for the FPN's 2× upsampling to
    line up. Each target gets ``size = [h, w]``, the unpadded image size.

    Returns:
        ``(images [N, 3, Hp, Wp], targets)``; images keep their dtype (float32 after Normalize).
    """
    if len(batch) == 0:
        raise ValueError("collate: empty batch")
    images = [image for image, _ in batch]
    for image in images:
        _check_image(image, "collate")
    if len({image.dtype for image in images}) != 1:
        raise ValueError(f"collate: images have mixed dtypes {sorted({str(i.dtype) for i in images})}")
    max_h = max(image.shape[1] for image in images)
    max_w = max(image.shape[2] for image in images)
    if size_divisible > 1:
        max_h = -(-max_h // size_divisible) * size_divisible
        max_w = -(-max_w // size_divisible) * size_divisible
    padded = images[0].new_zeros((len(images), 3, max_h, max_w))  # (N, 3, Hp, Wp)
    targets: list[Target] = []
    for i, (image, target) in enumerate(batch):
        _, h, w = image.shape
        padded[i, :, :h, :w] = image
        target = dict(target)
        target["size"] = torch.tensor([h, w], dtype=torch.int64)
        targets.append(target)
    return padded, targets


def build_transforms(
    *,
    train: bool,
    min_size: int | Sequence[int] = 800,
    max_size: float | None = 1333,
    crop: int | tuple[int, int] | None = None,
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """resize → flip (train only, if ``flip``) → crop (if given) → normalize.

    The paper's proxy (search) task is ``build_transforms(train=True, min_size=384,
    max_size=10**9, crop=384)``. ``crop`` is for training data (the proxy features too):
    ``predict_dataset`` refuses a cropping dataset (it maps detections back by ``scale``).
    """
    steps: list[Any] = [Resize(min_size, max_size)]
    if train and flip:
        steps.append(RandomHorizontalFlip(0.5))
    if crop is not None:
        steps.append(RandomCrop(crop))
    steps.append(Normalize(mean, std))
    return Compose(steps)
