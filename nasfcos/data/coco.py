"""COCO-format detection dataset (any ``instances_*.json``-style file).

Legend: M = annotations of one image, K = categories.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from nasfcos.data.common import DataError, DetectionDataset, ImageRecord, Transforms, empty_boxes
from nasfcos.errors import one_line

log = logging.getLogger(__name__)


def _field(entry: Any, key: str, json_path: Path, where: str) -> Any:
    if not isinstance(entry, dict):
        raise DataError(f"{json_path}: {where} must be an object, got {type(entry).__name__}")
    if key not in entry:
        raise DataError(f"{json_path}: missing field {where}.{key}")
    return entry[key]


def _int(entry: Any, key: str, json_path: Path, where: str) -> int:
    value = _field(entry, key, json_path, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise DataError(f"{json_path}: {where}.{key} must be an integer, got {value!r}")
    return int(value)


def _list(data: dict[str, Any], key: str, json_path: Path) -> list[Any]:
    if key not in data:
        raise DataError(f"{json_path}: missing field {key}")
    if not isinstance(data[key], list):
        raise DataError(f"{json_path}: {key} must be a list, got {type(data[key]).__name__}")
    return data[key]


def load_json(json_path: Path) -> dict[str, Any]:
    """Read a json file whose top level is an object; any failure is a one-line DataError."""
    if not json_path.is_file():
        raise DataError(f"{json_path}: annotation file not found")
    try:
        with open(json_path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: malformed JSON ({one_line(e, with_type=False)})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{json_path}: cannot read ({one_line(e, with_type=False)})") from e
    if not isinstance(data, dict):
        raise DataError(f"{json_path}: top level must be a JSON object, got {type(data).__name__}")
    return data


class COCODetection(DetectionDataset):
    """COCO-format detection; the json is parsed and validated in the constructor.

    Category ids (e.g. COCO's 1..90 with gaps) map to contiguous labels ``0..K-1`` in
    increasing id order; ``category_ids[label]`` maps back. ``iscrowd=1`` boxes are kept with
    ``ignore=True``; zero-width/height boxes (real COCO has a few) are left out of the
    training targets but stay in :meth:`coco_gt`.

    Args:
        ann_file: the json (``images``, ``annotations``, ``categories``).
        image_root: directory that relative ``file_name`` entries are resolved against.
        transforms: ``(image, target) -> (image, target)``.
        remove_empty: drop images with no non-ignored box (the FCOS training filter).
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        *,
        transforms: Transforms | None = None,
        remove_empty: bool = False,
    ) -> None:
        self.ann_file = json_path = Path(ann_file)
        self.image_root = Path(image_root)
        data = load_json(json_path)

        # Categories: sorted by id so labels are stable whatever the json order.
        categories = _list(data, "categories", json_path)
        cats: dict[int, str] = {}
        for i, cat in enumerate(categories):
            where = f"categories[{i}]"
            cid = _int(cat, "id", json_path, where)
            name = _field(cat, "name", json_path, where)
            if cid in cats:
                raise DataError(f"{json_path}: {where}.id {cid} is duplicated")
            cats[cid] = str(name)
        if not cats:
            raise DataError(f"{json_path}: categories is empty")
        category_ids = sorted(cats)
        label_of = {cid: label for label, cid in enumerate(category_ids)}

        # Images, in json order.
        images: dict[int, dict[str, Any]] = {}
        for i, img in enumerate(_list(data, "images", json_path)):
            where = f"images[{i}]"
            image_id = _int(img, "id", json_path, where)
            file_name = _field(img, "file_name", json_path, where)
            width = _int(img, "width", json_path, where)
            height = _int(img, "height", json_path, where)
            if not isinstance(file_name, str) or not file_name:
                raise DataError(f"{json_path}: {where}.file_name must be a non-empty string, got {file_name!r}")
            if width <= 0 or height <= 0:
                raise DataError(f"{json_path}: {where} (id {image_id}): width/height must be positive, got {width}x{height}")
            if image_id in images:
                raise DataError(f"{json_path}: {where}.id {image_id} is duplicated")
            images[image_id] = {"file_name": file_name, "width": width, "height": height, "boxes": [], "labels": [], "ignore": []}

        # Annotations: test-dev style files have none, so the key is optional.
        raw_annotations = data.get("annotations", [])
        if not isinstance(raw_annotations, list):
            raise DataError(f"{json_path}: annotations must be a list, got {type(raw_annotations).__name__}")
        for i, ann in enumerate(raw_annotations):
            where = f"annotations[{i}]"
            ann_id = _field(ann, "id", json_path, where)
            image_id = _int(ann, "image_id", json_path, where)
            cid = _int(ann, "category_id", json_path, where)
            bbox = _field(ann, "bbox", json_path, where)
            if image_id not in images:
                raise DataError(f"{json_path}: {where} (id {ann_id}): image_id {image_id} is not in images")
            if cid not in label_of:
                raise DataError(f"{json_path}: {where} (id {ann_id}): category_id {cid} is not in categories")
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
                raise DataError(f"{json_path}: {where}.bbox (id {ann_id}) must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            x, y, w, h = (float(v) for v in bbox)
            if w < 0 or h < 0:
                raise DataError(f"{json_path}: {where} (id {ann_id}): bbox has negative size (w={w:g}, h={h:g})")
            if w == 0 or h == 0:
                continue  # a degenerate box has no area to regress to; dropped from training only
            entry = images[image_id]
            entry["boxes"].append([x, y, x + w, y + h])
            entry["labels"].append(label_of[cid])
            entry["ignore"].append(bool(ann.get("iscrowd", 0)))

        records = []
        for image_id, entry in images.items():
            if remove_empty and not (len(entry["ignore"]) and not all(entry["ignore"])):
                continue
            if entry["boxes"]:
                boxes = np.asarray(entry["boxes"], np.float32).reshape(-1, 4)  # (M, 4)
                labels = np.asarray(entry["labels"], np.int64)  # (M,)
                ignore = np.asarray(entry["ignore"], bool)  # (M,)
            else:
                boxes, labels, ignore = empty_boxes()
            records.append(
                ImageRecord(
                    image_id=image_id,
                    # An absolute file_name wins over image_root (pathlib join semantics).
                    path=self.image_root / entry["file_name"],
                    file_name=entry["file_name"],
                    width=entry["width"],
                    height=entry["height"],
                    boxes=boxes,
                    labels=labels,
                    ignore=ignore,
                    source=json_path,
                )
            )

        if remove_empty:
            log.info("%s: dropped %d of %d images without a non-crowd box (remove_empty)", json_path, len(images) - len(records), len(images))
        kept = {r.image_id for r in records}
        # The evaluation ground truth: the loaded json restricted to this dataset's images.
        self._gt = {
            "images": [img for img in data["images"] if img["id"] in kept],
            "annotations": [ann for ann in raw_annotations if ann["image_id"] in kept],
            "categories": categories,
        }
        if "info" in data:
            self._gt["info"] = data["info"]
        super().__init__(
            classes=[cats[cid] for cid in category_ids],
            category_ids=category_ids,
            records=records,
            transforms=transforms,
        )

    def coco_gt(self) -> dict[str, Any]:
        """A deep copy of the json's images/annotations/categories (of the kept images)."""
        return copy.deepcopy(self._gt)
