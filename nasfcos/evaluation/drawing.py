"""Detections drawn on their images: ``nasfcos predict --draw`` and the evaluate stage's
``full/<arch_id>/detections.jpg`` (a few val images of a trained arch, shown by its model card
and the run's report). torchvision's ``draw_bounding_boxes`` does the drawing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.utils import draw_bounding_boxes, make_grid

DRAW_THRESH = 0.3  # at evaluation's 0.05 a detector draws a hundred boxes an image


def draw_detections(image: Tensor, boxes: Tensor, names: Sequence[str], scores: Sequence[float]) -> Tensor:
    """``image`` (3, H, W) uint8 with ``boxes`` (D, 4) x1y1x2y2 in its pixels drawn, each captioned
    with its class name and score."""
    captions = [f"{name} {float(score):.2f}" for name, score in zip(names, scores, strict=True)]
    return draw_bounding_boxes(image, boxes, labels=captions, width=1) if len(boxes) else image


def detections_grid(items: Sequence[tuple[Tensor, Sequence[dict]]], names: dict[int, str], *, thresh: float = DRAW_THRESH, height: int = 240) -> Tensor:
    """One row of images, each with its COCO results rows (``bbox`` x, y, w, h; ``category_id``;
    ``score``) of score >= ``thresh`` drawn, scaled to ``height`` px: (3, height + 4, W) uint8."""
    drawn = []
    for image, rows in items:
        rows = [r for r in rows if r["score"] >= thresh]
        # scaled first, then drawn: lines and captions keep their pixel size on a large photo
        scale = height / image.shape[-2]
        width = max(1, round(image.shape[-1] * scale))
        small = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)], dtype=torch.float32).reshape(-1, 4) * scale
        drawn.append(draw_detections(small, boxes, [str(names.get(r["category_id"], r["category_id"])) for r in rows], [r["score"] for r in rows]))
    widest = max(p.shape[-1] for p in drawn)
    padded = [F.pad(p, (0, widest - p.shape[-1]), value=255) for p in drawn]  # white, as the grid's own padding
    return make_grid(padded, nrow=len(padded), padding=2, pad_value=255)
