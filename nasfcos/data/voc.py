"""Pascal VOC detection dataset (VOC2007 / VOC2012 ``VOCdevkit`` layout).

Legend: M = objects of one image, K = classes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np

from nasfcos.data.common import DataError, DetectionDataset, ImageRecord, Transforms, empty_boxes
from nasfcos.errors import one_line

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def read_split(path: Path) -> list[str]:
    """Image names of a split file: the first token of each non-blank line."""
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read split file ({one_line(e, with_type=False)})") from e
    # First token: also accepts the per-class files ("2008_000008  1").
    names = [line.split()[0] for line in lines if line.strip()]
    if not names:
        raise DataError(f"{path}: split file lists no images")
    return names


def _text(node: ET.Element, field: str, xml_path: Path, where: str) -> str:
    child = node.find(field)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"{xml_path}: {where}missing field '{field}'")
    return child.text.strip()


def _number(node: ET.Element, field: str, xml_path: Path, where: str) -> float:
    text = _text(node, field, xml_path, where)
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{xml_path}: {where}field '{field}' is not a number ({text!r})") from None


def parse_voc_xml(xml_path: Path, class_index: dict[str, int]) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """Parse one VOC annotation file.

    Returns:
        ``(width, height, boxes [M, 4], labels [M], ignore [M])``; VOC's 1-based inclusive
        pixel box ``xmin..xmax`` becomes the continuous ``[xmin - 1, xmax)``; difficult
        objects are kept with ``ignore=True``.
    """
    if not xml_path.is_file():
        raise DataError(f"{xml_path}: annotation not found")
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"{xml_path}: malformed XML ({one_line(e, with_type=False)})") from e

    size = root.find("size")
    if size is None:
        raise DataError(f"{xml_path}: missing field 'size'")
    width = _number(size, "width", xml_path, "")
    height = _number(size, "height", xml_path, "")
    if width <= 0 or height <= 0 or width != int(width) or height != int(height):
        raise DataError(f"{xml_path}: size must be positive integers (width={width:g}, height={height:g})")

    boxes, labels, ignore = [], [], []
    # The object index in messages counts <object> elements from 0, in file order.
    for k, obj in enumerate(root.findall("object")):
        where = f"object {k}: "
        name = _text(obj, "name", xml_path, where)
        if name not in class_index:
            raise DataError(f"{xml_path}: {where}unknown class {name!r} (known: {', '.join(class_index)})")
        # VOC2012 omits <difficult> on some objects; absent means 0, as in the devkit.
        difficult = obj.find("difficult")
        is_difficult = difficult is not None and (difficult.text or "0").strip() not in ("0", "")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(f"{xml_path}: {where}missing field 'bndbox'")
        xmin, ymin, xmax, ymax = (_number(bndbox, f, xml_path, where) for f in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin:
            raise DataError(f"{xml_path}: {where}xmax ({xmax:g}) < xmin ({xmin:g})")
        if ymax < ymin:
            raise DataError(f"{xml_path}: {where}ymax ({ymax:g}) < ymin ({ymin:g})")
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        labels.append(class_index[name])
        ignore.append(is_difficult)

    if not boxes:
        return int(width), int(height), *empty_boxes()
    return (
        int(width),
        int(height),
        np.asarray(boxes, np.float32).reshape(-1, 4),  # (M, 4)
        np.asarray(labels, np.int64),  # (M,)
        np.asarray(ignore, bool),  # (M,)
    )


class VOCDetection(DetectionDataset):
    """Pascal VOC detection, all annotations parsed (and validated) in the constructor.

    Args:
        root: a year directory (``.../VOCdevkit/VOC2007``) with ``JPEGImages/``,
            ``Annotations/`` and ``ImageSets/Main/<image_set>.txt``.
        image_set: split name under ``ImageSets/Main``.
        split_file: any file with one image name per line; overrides ``image_set``.
        classes: class names; label ``i`` is ``classes[i]``, category id ``i + 1``.
        transforms: ``(image, target) -> (image, target)``, e.g. from ``build_transforms``.

    Image ids are the 1-based line position in the split file. Width and height come from
    the XML ``size`` field (checked against the decoded image in ``__getitem__``).

    Example:
        >>> ds = VOCDetection("VOCdevkit/VOC2007", image_set="test")  # doctest: +SKIP
        >>> image, target = ds[0]  # uint8 [3, H, W], {"boxes": [M, 4], "labels": [M], ...}
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_set: str = "train",
        split_file: str | Path | None = None,
        classes: Sequence[str] = VOC_CLASSES,
        transforms: Transforms | None = None,
    ) -> None:
        self.root = Path(root)
        classes = list(classes)
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"VOCDetection: classes must be non-empty and unique, got {classes}")
        split = Path(split_file) if split_file is not None else self.root / "ImageSets" / "Main" / f"{image_set}.txt"
        self.split_file = split
        class_index = {name: i for i, name in enumerate(classes)}

        records = []
        for position, name in enumerate(read_split(split), start=1):
            xml_path = self.root / "Annotations" / f"{name}.xml"
            width, height, boxes, labels, ignore = parse_voc_xml(xml_path, class_index)
            records.append(
                ImageRecord(
                    image_id=position,
                    path=self.root / "JPEGImages" / f"{name}.jpg",
                    file_name=f"{name}.jpg",
                    width=width,
                    height=height,
                    boxes=boxes,
                    labels=labels,
                    ignore=ignore,
                    source=xml_path,
                )
            )
        super().__init__(
            classes=classes,
            category_ids=list(range(1, len(classes) + 1)),
            records=records,
            transforms=transforms,
        )
