"""A tiny synthetic shapes dataset written in both VOC and COCO layouts.

It exists so the whole pipeline (loaders, training, search, evaluation) can run end to end
in seconds without downloading VOC/COCO, on data a small CNN can actually learn: saturated
filled shapes on low-contrast textured backgrounds, colour independent of class, so the
class must be read from the shape.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

_MIN_OBJECT = 10  # px, smallest shape extent
_MIN_VISIBLE = 4  # px, smallest visible box side after clipping at the border
_MAX_OVERLAP = 0.3  # intersection / smaller box area allowed between two objects
_MIN_CONTRAST = 110.0  # RGB distance between an object's colour and the background base


def _background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Low-contrast texture (gradient + stripes + noise, at most ~±30 grey levels) and its base colour."""
    base = rng.uniform(80, 175) + rng.uniform(-15, 15, size=3)  # (3,)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    ramp = (xx * math.cos(angle) + yy * math.sin(angle)) / max(height, width)
    ramp -= ramp.mean()  # centred, so the base colour stays the typical background colour
    gradient = rng.uniform(4, 12) * ramp
    stripe_angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 20)
    phase = (xx * math.cos(stripe_angle) + yy * math.sin(stripe_angle)) * (2 * math.pi / period)
    stripes = rng.uniform(0, 6) * np.sin(phase)
    noise = rng.normal(0, rng.uniform(1, 4), size=(height, width))
    texture = (gradient + stripes + noise)[..., None]  # (H, W, 1)
    return base[None, None, :] + texture, base  # (H, W, 3), (3,)


def _shape_polygon(kind: str, cx: float, cy: float, size: float, angle: float) -> list[tuple[float, float]] | None:
    """Vertices for polygon shapes; None for the circle (drawn as an ellipse)."""
    if kind == "square":
        h = size / 2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        r = size / 2
        return [(cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    return None


def _shape_mask(kind: str, height: int, width: int, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """Boolean (H, W) mask of the shape, clipped to the image."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    polygon = _shape_polygon(kind, cx, cy, size, angle)
    if polygon is None:
        r = size / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(polygon, fill=255)
    return np.asarray(canvas) > 0


def _object_colour(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    while True:
        colour = rng.integers(0, 256, size=3).astype(np.float32)
        if np.linalg.norm(colour - base) >= _MIN_CONTRAST:
            return colour


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller area of two x1y1x2y2 boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _draw_image(rng: np.random.Generator, height: int, width: int, classes: Sequence[str], max_objects: int) -> tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int]]]]:
    """One image (uint8 H×W×3) and its objects as (label, x1y1x2y2 integer pixel box, x2/y2 exclusive)."""
    pixels, base = _background(rng, height, width)
    objects: list[tuple[int, tuple[int, int, int, int]]] = []
    wanted = int(rng.integers(1, max_objects + 1))
    largest = max(_MIN_OBJECT + 1.0, min(height, width) / 2)
    for _ in range(wanted):
        for _attempt in range(30):
            label = int(rng.integers(len(classes)))
            size = float(math.exp(rng.uniform(math.log(_MIN_OBJECT), math.log(largest))))
            # Centres reach 0.1·size past the inner margin, so large shapes sometimes cross the border.
            cx = rng.uniform(0.1 * size, width - 0.1 * size)
            cy = rng.uniform(0.1 * size, height - 0.1 * size)
            angle = rng.uniform(0, 2 * math.pi)
            mask = _shape_mask(classes[label], height, width, cx, cy, size, angle)
            rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
            if rows.size == 0:
                continue
            box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
            if box[2] - box[0] < _MIN_VISIBLE or box[3] - box[1] < _MIN_VISIBLE:
                continue
            if any(_overlap(box, other) > _MAX_OVERLAP for _, other in objects):
                continue
            pixels[mask] = _object_colour(rng, base)
            objects.append((label, box))
            break
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), objects


def _voc_xml(name: str, height: int, width: int, objects: list[tuple[str, tuple[int, int, int, int]]]) -> bytes:
    """A VOC annotation; bndbox is 1-based inclusive (pixel columns c0..c1 → xmin=c0+1, xmax=c1+1)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "nasfcos synthetic shapes"
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(width)
    ET.SubElement(size, "height").text = str(height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for class_name, (x1, y1, x2, y2) in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = class_name
        ET.SubElement(obj, "pose").text = "Unspecified"
        truncated = x1 == 0 or y1 == 0 or x2 == width or y2 == height
        ET.SubElement(obj, "truncated").text = str(int(truncated))
        ET.SubElement(obj, "difficult").text = "0"
        bndbox = ET.SubElement(obj, "bndbox")
        # Exclusive end x2 is the last covered column + 1, i.e. that column's 1-based index.
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bndbox, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def make_synthetic(
    root: str | Path,
    *,
    num_train: int = 200,
    num_val: int = 50,
    image_size: int | tuple[int, int] = (128, 160),
    classes: Sequence[str] = SHAPES,
    max_objects: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a synthetic shapes dataset under ``root``; same ``seed`` → identical files.

    Args:
        image_size: an int for square images of that side, or ``(lo, hi)``: each image's
            height and width are drawn independently from ``lo..hi`` (``lo == hi``: fixed).
        classes: shape names drawn, each one of :data:`SHAPES`; label ``i`` → category id ``i+1``.

    Returns:
        ``{"voc_root", "image_root", "train_json", "val_json", "classes"}``: the VOC year
        directory (``root/VOCdevkit/VOC2012``), its ``JPEGImages``, the COCO jsons
        (``root/annotations/instances_{train,val}.json``, ``file_name`` relative to
        ``image_root``) as strings, and the class names. In both layouts image ids are the
        1-based position in the split, so the VOC and COCO loaders agree.
    """
    classes = list(classes)
    unknown = [c for c in classes if c not in SHAPES]
    if not classes or unknown or len(set(classes)) != len(classes):
        raise ValueError(f"make_synthetic: classes must be unique names from {SHAPES}, got {classes}")
    if num_train < 1 or num_val < 0:
        raise ValueError(f"make_synthetic: need num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")
    if max_objects < 1:
        raise ValueError(f"make_synthetic: max_objects must be >= 1, got {max_objects}")
    lo, hi = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if not 2 * _MIN_OBJECT <= lo <= hi:
        raise ValueError(f"make_synthetic: image_size must satisfy {2 * _MIN_OBJECT} <= lo <= hi, got {image_size!r}")

    root = Path(root)
    voc_root = root / "VOCdevkit" / "VOC2012"
    image_root = voc_root / "JPEGImages"
    ann_dir = voc_root / "Annotations"
    split_dir = voc_root / "ImageSets" / "Main"
    json_dir = root / "annotations"
    for d in (image_root, ann_dir, split_dir, json_dir):
        d.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
    paths: dict[str, Any] = {"voc_root": str(voc_root), "image_root": str(image_root), "classes": classes}
    counter = 0
    for split, count in (("train", num_train), ("val", num_val)):
        names: list[str] = []
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for position in range(1, count + 1):
            counter += 1
            name = f"{counter:06d}"
            height, width = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
            pixels, objects = _draw_image(rng, height, width, classes, max_objects)
            Image.fromarray(pixels, "RGB").save(image_root / f"{name}.jpg", quality=95)
            (ann_dir / f"{name}.xml").write_bytes(_voc_xml(name, height, width, [(classes[label], box) for label, box in objects]))
            names.append(name)
            images.append({"id": position, "file_name": f"{name}.jpg", "width": width, "height": height})
            for label, (x1, y1, x2, y2) in objects:
                w, h = x2 - x1, y2 - y1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": position,
                        "category_id": label + 1,
                        "bbox": [float(x1), float(y1), float(w), float(h)],
                        "area": float(w * h),
                        "iscrowd": 0,
                    }
                )
        (split_dir / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        coco = {
            "info": {"description": f"nasfcos synthetic shapes ({split}, seed {seed})"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        json_path = json_dir / f"instances_{split}.json"
        json_path.write_text(json.dumps(coco))
        paths[f"{split}_json"] = str(json_path)
    return paths
