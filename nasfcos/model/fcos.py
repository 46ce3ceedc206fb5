"""FCOS points, target assignment, losses and post-processing (Tian et al., 2019).

Written once and shared by the proxy task (NAS-FCOS §3.3), full training and
evaluation. A decoder produces, for each pyramid level P3..P7, raw class
logits, raw box regression and a raw centerness logit; everything that turns
those into losses or detections lives here.

Two loss variants:

``paper``
    The FCOS reference code NAS-FCOS builds on: size ranges 0-64-128-256-512-inf,
    no centre sampling, box distances ``exp(scale_l * x)`` in pixels with a
    learnable scale per level, focal loss summed and divided by the number of
    positives plus the number of images (the 2019 reference ``FCOSLossComputation``:
    ``/ (num_pos + N)``, which also keeps it finite without positives), IoU loss
    ``-log((I+1)/(U+1))`` averaged with the centerness target as weight,
    centerness BCE averaged over positives.
``torchvision``
    ``torchvision.models.detection.FCOS``: centre sampling radius 1.5, strict
    range bounds, distances ``relu(x) * stride``, GIoU loss; every term summed
    and divided by the number of positives.

Letter legend: N images, P points over all levels, L levels, M ground truths,
K classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

INF = float("inf")
VARIANTS = ("paper", "torchvision")
# exp() of the scaled regression is clamped here so a diverging decoder yields a
# large but finite loss (the proxy then reports it) instead of inf/NaN boxes.
_MAX_LOG_DISTANCE = math.log(1e5)

LevelOutputs = list[tuple[Tensor, Tensor, Tensor]]  # per level: (N,K,H,W), (N,4,H,W), (N,1,H,W)


def scaled_size_ranges(strides: tuple[int, ...] = (8, 16, 32, 64, 128), scale: float = 1.0) -> tuple[tuple[float, float], ...]:
    """FCOS's regression range per level, 0-64-128-256-512-inf (8x each stride) times
    ``scale``: the proxy task scales them with its smaller input (NAS-FCOS §4.1,
    "target object sizes of interest are scaled correspondingly")."""
    if not scale > 0:
        raise ValueError(f"size range scale must be > 0, got {scale}")
    edges = [0.0] + [s * 8.0 * scale for s in strides[:-1]] + [INF]
    return tuple(zip(edges[:-1], edges[1:], strict=True))


@dataclass(frozen=True)
class Points:
    """Locations of all pyramid cells, levels concatenated (y-major within a level).

    xy: (P, 2) image coordinates; stride: (P,); level_sizes: points per level;
    level: (P,) each point's level index (an index, so per-level values are a gather:
    no host-side sizes, no host sync).
    """

    xy: Tensor
    stride: Tensor
    level_sizes: tuple[int, ...]
    level: Tensor


@dataclass(frozen=True)
class Assigned:
    """Per-point training targets: labels (N, P) with -1 for background and
    ltrb (N, P, 4) distances in pixels to the matched box (0 for background)."""

    labels: Tensor
    ltrb: Tensor


def flatten_outputs(outputs: LevelOutputs) -> tuple[Tensor, Tensor, Tensor]:
    """Per-level maps -> (N, P, K) logits, (N, P, 4) regression, (N, P) centerness."""
    cls, reg, ctr = [], [], []
    for c, r, t in outputs:
        N, K, H, W = c.shape
        cls.append(c.permute(0, 2, 3, 1).reshape(N, H * W, K))  # (N, HW, K)
        reg.append(r.permute(0, 2, 3, 1).reshape(N, H * W, 4))  # (N, HW, 4)
        ctr.append(t.reshape(N, H * W))  # (N, HW)
    return torch.cat(cls, 1), torch.cat(reg, 1), torch.cat(ctr, 1)


def centerness_target(ltrb: Tensor) -> Tensor:
    """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) for (..., 4) distances."""
    lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
    ratio = (lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values)
    return ratio.clamp(min=0).sqrt()


def iou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """FCOS's IoU loss -log((I+1)/(U+1)) on (M, 4) ltrb distances from the same point."""
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    w = torch.min(pred[:, 0], target[:, 0]) + torch.min(pred[:, 2], target[:, 2])
    h = torch.min(pred[:, 1], target[:, 1]) + torch.min(pred[:, 3], target[:, 3])
    inter = w * h
    union = pred_area + target_area - inter
    return -torch.log((inter + 1.0) / (union + 1.0))


def ltrb_to_boxes(xy: Tensor, ltrb: Tensor) -> Tensor:
    """(..., 2) points and (..., 4) distances -> (..., 4) x1y1x2y2 boxes."""
    return torch.cat([xy - ltrb[..., :2], xy + ltrb[..., 2:]], dim=-1)


class FCOS(nn.Module):
    """FCOS training targets, losses and inference for any decoder.

    Holds the only learnable FCOS-specific state: the per-level regression
    scales of the ``paper`` variant. The decoder (FPN + heads) is separate so
    that the searched decoders of NAS-FCOS plug in unchanged.

    Args:
        num_classes: K, foreground classes (no background class).
        variant: ``"paper"`` (default) or ``"torchvision"``; see module docstring.
        strides: strides of P3..P7.
        size_ranges: (lo, hi) regression range per level; default 0-64-...-inf (:func:`scaled_size_ranges`).
        center_sampling_radius: 0 disables; default 0 (paper) / 1.5 (torchvision).
        score_thresh: minimum class probability of a detection candidate.
        pre_nms_top_n: candidates kept per level before NMS.
        nms_thresh: IoU threshold of the class-wise NMS.
        max_detections: detections kept per image.
        sync_free: compute the box losses densely with masks instead of on the gathered
            positives (no host sync in the loss; the same sums up to float summation order).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        variant: str = "paper",
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        size_ranges: tuple[tuple[float, float], ...] | None = None,
        center_sampling_radius: float | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        score_thresh: float = 0.05,
        pre_nms_top_n: int = 1000,
        nms_thresh: float = 0.6,
        max_detections: int = 100,
        sync_free: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"loss variant {variant!r} is not one of {VARIANTS}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if size_ranges is None:
            size_ranges = scaled_size_ranges(tuple(strides))  # 0, 64, 128, 256, 512, inf
        if len(size_ranges) != len(strides):
            raise ValueError(f"{len(size_ranges)} size ranges for {len(strides)} strides")
        self.num_classes = num_classes
        self.variant = variant
        self.strides = tuple(strides)
        self.size_ranges = tuple((float(a), float(b)) for a, b in size_ranges)
        if center_sampling_radius is None:
            center_sampling_radius = 1.5 if variant == "torchvision" else 0.0
        self.center_sampling_radius = float(center_sampling_radius)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.score_thresh = score_thresh
        self.pre_nms_top_n = pre_nms_top_n
        self.nms_thresh = nms_thresh
        self.max_detections = max_detections
        self.sync_free = sync_free
        if variant == "paper":
            self.scales = nn.Parameter(torch.ones(len(strides)))
        else:
            self.register_parameter("scales", None)

    # ------------------------------------------------------------------ points
    def points(self, shapes: list[tuple[int, int]], device: torch.device | str = "cpu") -> Points:
        """Cell centres ``(x*s + s//2, y*s + s//2)`` of each level's (H, W) map."""
        if len(shapes) != len(self.strides):
            raise ValueError(f"got {len(shapes)} feature levels, expected {len(self.strides)}")
        xy, stride, level = [], [], []
        for i, ((H, W), s) in enumerate(zip(shapes, self.strides, strict=True)):
            ys = torch.arange(H, device=device, dtype=torch.float32) * s + s // 2
            xs = torch.arange(W, device=device, dtype=torch.float32) * s + s // 2
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            xy.append(torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1))  # (HW, 2)
            stride.append(torch.full((H * W,), float(s), device=device))
            level.append(torch.full((H * W,), i, dtype=torch.long, device=device))
        return Points(torch.cat(xy), torch.cat(stride), tuple(H * W for H, W in shapes), torch.cat(level))

    def _per_point_ranges(self, points: Points) -> Tensor:
        # filled on the device: a tensor from a Python list would be a host-to-device copy (a sync)
        dev = points.xy.device
        ranges = [torch.stack([torch.full((n,), lo, device=dev), torch.full((n,), hi, device=dev)], 1) for (lo, hi), n in zip(self.size_ranges, points.level_sizes, strict=True)]
        return torch.cat(ranges)  # (P, 2)

    # ----------------------------------------------------------------- targets
    def assign(self, points: Points, targets: list[dict[str, Tensor]]) -> Assigned:
        """Match every point to at most one ground-truth box per image.

        A point is positive for a box when it lies inside it (and inside the
        centre region when centre sampling is on) and the box's largest ltrb
        distance falls in the level's size range; among several such boxes the
        smallest wins. Boxes flagged ``ignore`` (VOC difficult, COCO crowd) are
        not used for training, as in the FCOS reference code.
        """
        ranges = self._per_point_ranges(points)
        labels, ltrbs = [], []
        for t in targets:
            boxes, cls = t["boxes"].to(points.xy), t["labels"].to(points.xy.device)
            # ignored boxes stay in place but match no point (a mask, not a filter: no host sync)
            usable = ~t["ignore"].to(points.xy.device) if "ignore" in t else None
            lab, ltrb = self._assign_image(points, ranges, boxes, cls, usable)
            labels.append(lab)
            ltrbs.append(ltrb)
        return Assigned(torch.stack(labels), torch.stack(ltrbs))

    def _assign_image(self, points: Points, ranges: Tensor, boxes: Tensor, cls: Tensor, usable: Tensor | None = None) -> tuple[Tensor, Tensor]:
        P, M = points.xy.shape[0], boxes.shape[0]
        if M == 0:
            return cls.new_full((P,), -1), points.xy.new_zeros((P, 4))
        x, y = points.xy[:, 0:1], points.xy[:, 1:2]  # (P, 1)
        ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=2)  # (P, M, 4)
        match = ltrb.min(dim=2).values > 0  # inside the box
        if usable is not None:
            match &= usable[None, :]
        if self.center_sampling_radius > 0:
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (M, 2)
            dist = (points.xy[:, None, :] - centres[None]).abs().max(dim=2).values  # (P, M)
            match &= dist < self.center_sampling_radius * points.stride[:, None]
        max_dist = ltrb.max(dim=2).values  # (P, M)
        lo, hi = ranges[:, 0:1], ranges[:, 1:2]
        if self.variant == "paper":
            match &= (max_dist >= lo) & (max_dist <= hi)
        else:  # torchvision: strict bounds
            match &= (max_dist > lo) & (max_dist < hi)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # (M,)
        cost = torch.where(match, area[None, :].expand(P, M), torch.full_like(max_dist, INF))
        min_area, idx = cost.min(dim=1)  # (P,)
        background = min_area == INF
        labels = torch.where(background, torch.full_like(cls[idx], -1), cls[idx])  # (P,); where, not a masked write: no host sync
        matched = ltrb[torch.arange(P, device=idx.device), idx]  # (P, 4)
        matched = torch.where(background[:, None], torch.zeros_like(matched), matched)
        return labels, matched

    # ------------------------------------------------------------------ losses
    def decode(self, reg: Tensor, points: Points, index: Tensor | None = None) -> Tensor:
        """(N, P, 4) raw regression -> (N, P, 4) ltrb distances in pixels; with ``index``
        (R,), ``reg`` is (R, 4), the rows of the points ``index`` (post-processing decodes
        only its candidates)."""
        reg = reg.float()
        if self.variant == "paper":
            # each level's scale expanded over its points: no sizes copied to the device, no
            # host sync, and the backward is one sum per level
            scale = torch.cat([self.scales[i].expand(n) for i, n in enumerate(points.level_sizes)])  # (P,)
            scale = scale[None, :, None] if index is None else scale[index, None]
            return torch.exp((reg * scale).clamp(max=_MAX_LOG_DISTANCE))
        stride = points.stride[None, :, None] if index is None else points.stride[index, None]
        return F.relu(reg) * stride

    def loss(self, outputs: LevelOutputs, targets: list[dict[str, Tensor]] | Assigned) -> dict[str, Tensor]:
        """Loss terms ``cls``, ``reg``, ``ctr`` for a decoder's level outputs.

        ``targets`` is either the per-image dicts (``boxes`` (M, 4) x1y1x2y2,
        ``labels`` (M,), optional ``ignore`` (M,)) or an ``Assigned`` computed
        earlier by :meth:`assign` for the same feature sizes (the proxy task
        caches it, since its inputs never change).
        """
        return self.combine(self.level_loss_sums(outputs, targets))

    def level_loss_sums(self, outputs: LevelOutputs, targets: list[dict[str, Tensor]] | Assigned) -> dict[str, Tensor]:
        """:meth:`loss_sums` of a decoder's level outputs (the arguments of :meth:`loss`).
        Distributed training all-reduces the normalisers between this and :meth:`combine`."""
        points = self.points([o[0].shape[-2:] for o in outputs], outputs[0][0].device)
        if not isinstance(targets, Assigned):
            targets = self.assign(points, targets)
        cls, reg, ctr = flatten_outputs(outputs)
        return self.loss_sums(cls, reg, ctr, points, targets)

    def loss_flat(self, cls: Tensor, reg: Tensor, ctr: Tensor, points: Points, assigned: Assigned) -> dict[str, Tensor]:
        """Losses on flattened outputs: cls (N, P, K), reg (N, P, 4), ctr (N, P)."""
        return self.combine(self.loss_sums(cls, reg, ctr, points, assigned))

    def loss_sums(self, cls: Tensor, reg: Tensor, ctr: Tensor, points: Points, assigned: Assigned) -> dict[str, Tensor]:
        """Un-normalised loss sums and their normalisers, so that losses over a
        whole dataset can be accumulated batch by batch and normalised once
        (the proxy reward, §3.3). :meth:`combine` turns them into losses."""
        cls, ctr = cls.float(), ctr.float()
        labels = assigned.labels
        pos = labels >= 0  # (N, P)
        one_hot = torch.zeros_like(cls).scatter_(2, labels.long().clamp(min=0)[..., None], pos[..., None].to(cls.dtype))  # (N, P, K)
        focal = sigmoid_focal_loss(cls, one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")
        if self.sync_free:
            return {"cls": focal, **self._box_sums_dense(reg, ctr, points, assigned, pos)}

        pred_ltrb = self.decode(reg, points)[pos]  # (Npos, 4)
        target_ltrb = assigned.ltrb[pos].float()  # (Npos, 4)
        ctr_target = centerness_target(target_ltrb)  # (Npos,)
        ctr_sum = F.binary_cross_entropy_with_logits(ctr[pos], ctr_target, reduction="sum")
        num_pos = pos.sum().float()
        # paper: the reference divides the focal sum by num_pos + N; torchvision: by max(num_pos, 1)
        cls_norm = num_pos + labels.shape[0] if self.variant == "paper" else num_pos
        if self.variant == "paper":
            # IoU loss weighted by the centerness target, normalised by the weights' sum
            reg_sum = (iou_loss(pred_ltrb, target_ltrb) * ctr_target).sum()
            reg_norm = ctr_target.sum()
        else:
            xy = points.xy[None].expand_as(reg[..., :2])[pos]
            reg_sum = generalized_box_iou_loss(ltrb_to_boxes(xy, pred_ltrb), ltrb_to_boxes(xy, target_ltrb), reduction="sum")
            reg_norm = num_pos
        return {"cls": focal, "reg": reg_sum, "ctr": ctr_sum, "num_pos": num_pos, "cls_norm": cls_norm, "reg_norm": reg_norm}

    def _box_sums_dense(self, reg: Tensor, ctr: Tensor, points: Points, assigned: Assigned, pos: Tensor) -> dict[str, Tensor]:
        """The regression and centerness sums of :meth:`loss_sums` over every point, each
        term weighted by ``pos``, instead of over the gathered positives: no boolean
        indexing, so no host sync (``sync_free``). The same sums up to summation order;
        background targets are 1s so every discarded term stays finite."""
        posf = pos.float()  # (N, P)
        target_ltrb = torch.where(pos[..., None], assigned.ltrb.float(), torch.ones_like(assigned.ltrb, dtype=torch.float32))  # (N, P, 4)
        ctr_target = centerness_target(target_ltrb) * posf  # (N, P), 0 off the positives
        ctr_sum = F.binary_cross_entropy_with_logits(ctr, ctr_target, weight=posf, reduction="sum")
        pred_ltrb = self.decode(reg, points)  # (N, P, 4)
        num_pos = posf.sum()
        cls_norm = num_pos + pos.shape[0] if self.variant == "paper" else num_pos
        if self.variant == "paper":
            reg_sum = (iou_loss(pred_ltrb.reshape(-1, 4), target_ltrb.reshape(-1, 4)) * ctr_target.reshape(-1)).sum()
            reg_norm = ctr_target.sum()
        else:
            xy = points.xy[None].expand_as(reg[..., :2])  # (N, P, 2)
            giou = generalized_box_iou_loss(ltrb_to_boxes(xy, pred_ltrb), ltrb_to_boxes(xy, target_ltrb), reduction="none")
            reg_sum, reg_norm = (giou * posf).sum(), num_pos
        return {"reg": reg_sum, "ctr": ctr_sum, "num_pos": num_pos, "cls_norm": cls_norm, "reg_norm": reg_norm}

    @staticmethod
    def combine(sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """cls divided by its normaliser (num_pos + N in the paper variant, num_pos in
        torchvision's; at least 1), ctr by the number of positives (at least 1), reg by
        its normaliser (centerness-weight sum in the paper variant), 0 without positives.
        Summed over batches first, the normalisers are those of the whole dataset."""
        return {
            "cls": sums["cls"] / sums["cls_norm"].clamp(min=1.0),
            "reg": sums["reg"] / sums["reg_norm"].clamp(min=1e-6),
            "ctr": sums["ctr"] / sums["num_pos"].clamp(min=1.0),
        }

    # --------------------------------------------------------------- inference
    @torch.no_grad()
    def postprocess(self, outputs: LevelOutputs, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` (D, 4) x1y1x2y2 in input pixels, ``scores`` (D,), ``labels`` (D,).

        Per level, candidates with class probability > ``score_thresh``, the top
        ``pre_nms_top_n`` of them by cls*ctr; score sqrt(sigmoid(cls) *
        sigmoid(ctr)) (the reference reports cls*ctr itself: the same ranking, so the
        same NMS and AP, only the score values differ); boxes clipped to ``image_sizes`` (H, W) (the unpadded
        size); class-wise NMS; ``max_detections`` kept.
        """
        points = self.points([o[0].shape[-2:] for o in outputs], outputs[0][0].device)
        cls, reg, ctr = flatten_outputs(outputs)
        N, P, K = cls.shape
        L = len(points.level_sizes)
        # every candidate of every image and level at once (one nonzero, no Python loop over levels)
        prob = torch.sigmoid(cls.float())  # (N, P, K)
        img, pt, label = torch.nonzero(prob > self.score_thresh).unbind(1)  # (C,) each, ordered by (image, point, class)
        score = prob[img, pt, label] * torch.sigmoid(ctr[img, pt].float())  # (C,) cls * ctr, the ranking
        # top pre_nms_top_n per (image, level): order by score (stable), then by group (stable),
        # so each group's candidates are contiguous and best first; keep the first n of each
        group = img * L + points.level[pt]  # (C,)
        order = torch.sort(score, descending=True, stable=True).indices
        order = order[torch.sort(group[order], stable=True).indices]
        counts = torch.bincount(group, minlength=N * L)  # (N*L,)
        rank = torch.arange(len(order), device=order.device) - (torch.cumsum(counts, 0) - counts)[group[order]]
        keep = order[rank < self.pre_nms_top_n]  # (C',), grouped by image, then level
        img, pt, label, score = img[keep], pt[keep], label[keep], score[keep]
        boxes = ltrb_to_boxes(points.xy[pt], self.decode(reg[img, pt], points, index=pt))  # (C', 4)
        hw = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)[img]  # (C', 2) unpadded H, W
        boxes = torch.minimum(boxes.clamp(min=0), hw[:, [1, 0, 1, 0]])
        scores = score.sqrt()
        results = []
        per_image = torch.bincount(img, minlength=N).tolist()  # the one host sync (NMS is per image)
        for b, s, lab in zip(boxes.split(per_image), scores.split(per_image), label.split(per_image), strict=True):
            nms = batched_nms(b, s, lab, self.nms_thresh)[: self.max_detections]
            results.append({"boxes": b[nms], "scores": s[nms], "labels": lab[nms]})
        return results
