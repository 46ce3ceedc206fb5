"""Pascal VOC detection AP (the devkit's ``VOCevaldet`` rules), from COCO-format inputs.

COCOeval is the wrong tool for VOC's ``difficult`` boxes: it turns them into crowd regions
and ignores every detection lying *inside* one (intersection over detection area), so a
small false positive inside a difficult box is forgiven. VOC ignores only a detection whose
best match (IoU >= 0.5) is a difficult box. This module implements the VOC rules on the same
inputs as :func:`nasfcos.evaluation.coco.coco_evaluate` — a COCO ground-truth dict whose ``iscrowd``
flags mark difficult boxes, and a COCO results list — so it scores any dataset.

Legend: D detections of one class, G ground truths of one image and class.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

IOU_THRESHOLD = 0.5


def average_precision(recall: np.ndarray, precision: np.ndarray, *, use_07_metric: bool = False) -> float:
    """Area under the precision-recall curve, as in the VOC devkit.

    Args:
        recall, precision: (D,) cumulative values at each rank, detections sorted by score.
        use_07_metric: VOC2007's 11-point mean of the best precision at recall >= 0, 0.1, .., 1;
            otherwise (VOC2010+) the exact area under the monotone precision envelope.
    """
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if use_07_metric:
        # t = i / 10 exactly (np.arange(0, 1.1, 0.1) gives 0.30000000000000004 > 3/10).
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.arange(11) / 10]))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: best precision at any higher recall
    step = np.flatnonzero(mrec[1:] != mrec[:-1])  # points where recall changes
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def _xyxy(bboxes: list) -> np.ndarray:
    """COCO xywh boxes -> (N, 4) x1y1x2y2."""
    b = np.asarray(bboxes, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def _iou(dets: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """(D, 4) x (G, 4) -> (D, G) IoU of continuous x1y1x2y2 boxes (no devkit +1 pixel: our
    boxes are already 0-based continuous, see ``nasfcos.data.voc.parse_voc_xml``)."""
    lt = np.maximum(dets[:, None, :2], gts[None, :, :2])
    rb = np.minimum(dets[:, None, 2:], gts[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)  # (D, G)
    area_d = (dets[:, 2:] - dets[:, :2]).prod(-1)
    area_g = (gts[:, 2:] - gts[:, :2]).prod(-1)
    union = area_d[:, None] + area_g[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _match_image(dets: np.ndarray, gts: np.ndarray, difficult: np.ndarray) -> np.ndarray:
    """Greedy VOC matching of one image's detections (sorted by score) to its ground truths.

    Each detection takes the gt of highest IoU (used or not, as the devkit does). Returns (D,)
    int8: 1 TP (IoU >= 0.5 with an unused non-difficult gt, which becomes used), -1 ignored
    (that gt is difficult), 0 FP (IoU < 0.5, no gt, or the gt was already used: a duplicate).
    """
    status = np.zeros(len(dets), np.int8)
    if len(gts) == 0:
        return status
    iou = _iou(dets, gts)  # (D, G)
    best, best_iou = iou.argmax(1), iou.max(1)
    used = np.zeros(len(gts), bool)
    # >=: VOCevaldet.m's `ovmax >= minoverlap` (py-faster-rcnn's Python port has `>`; tests pin 0.5 exactly)
    for d in np.flatnonzero(best_iou >= IOU_THRESHOLD):  # ascending = score order
        g = best[d]
        if difficult[g]:
            status[d] = -1
        elif not used[g]:
            status[d], used[g] = 1, True
    return status


def voc_evaluate(gt: dict, results: list[dict], *, use_07_metric: bool = False) -> dict:
    """VOC AP at IoU 0.5 of ``results`` (COCO results format) against a COCO gt dict.

    Annotations with ``iscrowd=1`` are VOC 'difficult': not counted in recall, and a detection
    whose best match is one is neither TP nor FP. Per class, detections are ranked by score
    (stable: ties keep the results order) and matched greedily as in :func:`_match_image`.

    Returns:
        ``{"VOC_mAP50": mean over classes with at least one non-difficult gt (nan if none),
        "VOC_AP50_per_class": {category name: AP, or None for a class without non-difficult
        gt (its AP is undefined: the devkit's 0/0)}}``. Neither argument is modified.
    """
    categories = gt.get("categories", [])
    cat_ids = [c["id"] for c in categories]
    names = [c.get("name", str(c["id"])) for c in categories]
    if len(set(names)) != len(names):  # keep the per-class dict lossless
        names = [f"{n} ({i})" for n, i in zip(names, cat_ids, strict=True)]
    known_images = {img["id"] for img in gt.get("images", [])}
    unknown = {r["image_id"] for r in results} - known_images
    if unknown:
        raise ValueError(f"results name {len(unknown)} image ids not in the ground truth, e.g. {sorted(unknown)[:3]}")
    unknown = {r["category_id"] for r in results} - set(cat_ids)
    if unknown:
        raise ValueError(f"results name category ids not in the ground truth: {sorted(unknown)[:5]}")

    gt_by = defaultdict(list)  # (category, image) -> annotations
    npos: dict[int, int] = defaultdict(int)  # category -> non-difficult gt count (recall's denominator)
    for ann in gt.get("annotations", []):
        gt_by[ann["category_id"], ann["image_id"]].append(ann)
        npos[ann["category_id"]] += not ann.get("iscrowd", 0)
    dets_by = defaultdict(list)  # category -> results
    for r in results:
        dets_by[r["category_id"]].append(r)

    per_class: dict[str, float | None] = {}
    for cat, name in zip(cat_ids, names, strict=True):
        if npos[cat] == 0:
            per_class[name] = None
            continue
        dets = dets_by[cat]
        order = np.argsort(-np.asarray([d["score"] for d in dets], np.float64), kind="stable")
        # Matching only interacts within an image: split the ranked list by image, keep ranks.
        ranks_by_image = defaultdict(list)
        for rank, k in enumerate(order):
            ranks_by_image[dets[k]["image_id"]].append(rank)
        status = np.zeros(len(dets), np.int8)  # by rank
        for image_id, ranks in ranks_by_image.items():
            anns = gt_by.get((cat, image_id), [])
            boxes = _xyxy([dets[order[r]]["bbox"] for r in ranks])
            status[ranks] = _match_image(boxes, _xyxy([a["bbox"] for a in anns]), np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool))
        status = status[status >= 0]  # ignored detections leave precision and recall unchanged
        tp = np.cumsum(status == 1)
        fp = np.cumsum(status == 0)
        recall = tp / npos[cat]
        precision = tp / (tp + fp)  # tp + fp = rank + 1 once ignored detections are dropped
        per_class[name] = average_precision(recall, precision, use_07_metric=use_07_metric)

    defined = [ap for ap in per_class.values() if ap is not None]
    return {"VOC_mAP50": float(np.mean(defined)) if defined else math.nan, "VOC_AP50_per_class": per_class}
