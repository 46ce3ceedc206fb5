"""COCO-style evaluation with pycocotools and COCO results export (test-dev format).

Detections are mapped back to original-image pixels and original category ids,
so the same json is valid for a local COCOeval and for a test-dev submission.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import threading
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, Dataset

import atomicio
from nasfcos.data.transforms import collate
from nasfcos.progress import Progress

_STDOUT_LOCK = threading.Lock()
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_evaluate(gt: dict, results: list[dict]) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl of ``results`` (COCO results format) against a
    COCO-format ground-truth dict. Neither argument is modified. No detections
    gives 0.0 everywhere (pycocotools itself refuses an empty result list)."""
    if not results:
        return {k: 0.0 for k in METRICS}
    gt = copy.deepcopy(gt)
    for i, ann in enumerate(gt.get("annotations", [])):
        ann.setdefault("iscrowd", 0)
        ann.setdefault("id", i + 1)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    known = {img["id"] for img in gt.get("images", [])}
    unknown = {r["image_id"] for r in results} - known
    if unknown:
        raise ValueError(f"results name {len(unknown)} image ids not in the ground truth, e.g. {sorted(unknown)[:3]}")
    # pycocotools prints progress; redirect_stdout swaps the process's sys.stdout, so two
    # threads (proxy slots scoring the AP reward) must not interleave their redirections
    with _STDOUT_LOCK, contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(METRICS, ev.stats[:6], strict=True)}


def to_coco_results(image_id: int, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, category_ids: list[int]) -> list[dict]:
    """(D, 4) x1y1x2y2 boxes in original pixels -> COCO result dicts (bbox xywh, original category id)."""
    b = boxes.detach().cpu().double().numpy()
    xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1) if len(b) else b.reshape(0, 4)
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_ids[int(lab)]),
            "bbox": [round(float(v), 2) for v in box],
            "score": round(float(s), 5),
        }
        for box, s, lab in zip(xywh, scores.tolist(), labels.tolist(), strict=True)
    ]


def to_original(boxes: torch.Tensor, scale: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Boxes of a resized image back in the original image's pixels (``scale``: [sy, sx] of the
    resize, ``hw``: the original height and width), clipped to it."""
    sy, sx = float(scale[0]), float(scale[1])
    boxes = boxes.cpu() / torch.tensor([sx, sy, sx, sy])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, hw[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, hw[0])
    return boxes


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset: Dataset,
    *,
    category_ids: list[int],
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    num_workers: int = 0,
) -> list[dict]:
    """Run ``model.predict`` over a dataset built with eval transforms (resize +
    normalise; targets carry ``scale`` and ``orig_size``) and return COCO results.

    A dataset whose transforms crop (targets carry ``crop``, e.g. ``build_transforms(
    crop=...)``) is refused: detections map back by ``scale`` only, so they would be
    shifted and the image outside the window never seen. Cropping stays legal where
    boxes come from the target (training, the proxy features)."""
    model.eval()
    # a fixed generator: DataLoader draws its worker base seed from the global one otherwise
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate, generator=torch.Generator().manual_seed(0))
    results: list[dict] = []
    with Progress(len(dataset), "predict", unit="img") as bar:
        for images, targets in loader:
            if any("crop" in t for t in targets):
                raise ValueError("predict_dataset: the dataset's transforms crop the images; evaluate with build_transforms(..., crop=None)")
            sizes = [tuple(int(v) for v in t["size"]) for t in targets]
            dets = model.predict(images.to(device), sizes)
            for det, t in zip(dets, targets, strict=True):
                boxes = to_original(det["boxes"], t.get("scale", torch.ones(2)), tuple(int(v) for v in t["orig_size"]))
                results += to_coco_results(int(t["image_id"]), boxes, det["scores"].cpu(), det["labels"].cpu(), category_ids)
            bar.update(len(targets))
    return results


def save_results(results: list[dict], path: str | Path) -> Path:
    """Write a COCO results json atomically (temp file + rename)."""
    return atomicio.write_text(path, json.dumps(results))
