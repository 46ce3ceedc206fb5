"""What the VOC and COCO datasets share: the error type, image decoding and the base dataset.

Legend: M = ground-truth boxes of one image, K = classes, H/W = image height/width.

Boxes are float32 ``x1y1x2y2`` in absolute, 0-based *continuous* pixel coordinates
(a box covering pixel columns 0..9 is ``[0, 10)`` → ``x1=0, x2=10``), the same
convention torchvision and the COCO json use.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, read_file

from nasfcos.errors import one_line

# torchvision 0.29 marks its decoders deprecated in favour of torchcodec; they still work and
# are what torch 2.11 / torchvision 0.26 (the GPU machines) have, so silence the notice.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)

Target = dict[str, Any]
Transforms = Callable[[Tensor, Target], tuple[Tensor, Target]]


class DataError(ValueError):
    """Bad input data; the message is one line starting with the offending file path.

    One line so a log grep or a Prefect failure summary shows the whole reason; multi-line
    causes (libjpeg, json) go through ``nasfcos.errors.one_line`` first.
    """


def read_image(path: str | Path) -> Tensor:
    """Decode an image file to RGB ``uint8 Tensor[3, H, W]`` (grey and CMYK converted).

    Raises:
        DataError: ``"<path>: image not found"`` or ``"<path>: cannot decode image (...)"``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        data = read_file(str(path))
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as e:
        raise DataError(f"{path}: cannot decode image ({one_line(e, with_type=False)})") from e
    if image.ndim != 3 or image.shape[0] != 3:
        raise DataError(f"{path}: cannot decode image (decoded shape {tuple(image.shape)}, expected (3, H, W))")
    return image


@dataclass(frozen=True)
class ImageRecord:
    """One image's parsed annotations, kept as numpy so DataLoader workers share them cheaply.

    ``boxes`` (float32 [M, 4] x1y1x2y2), ``labels`` (int64 [M], contiguous 0..K-1) and
    ``ignore`` (bool [M]) are the *training* boxes; ``source`` is the annotation file that
    described the image (named in errors).
    """

    image_id: int
    path: Path
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    source: Path


class DetectionDataset(torch.utils.data.Dataset):
    """Base of :class:`VOCDetection` and :class:`COCODetection`: records in, (image, target) out.

    ``__getitem__(i)`` returns ``(image, target)`` where ``image`` is ``uint8 [3, H, W]`` when
    ``transforms`` is None and ``target`` holds ``boxes`` (float32 [M, 4] x1y1x2y2),
    ``labels`` (int64 [M], index into ``classes``), ``ignore`` (bool [M]: VOC difficult /
    COCO crowd, not to be counted as positives nor as misses), ``image_id`` (int) and
    ``orig_size`` (int64 [2] = H, W of the file on disk); transforms may add ``scale``,
    ``crop`` and ``size``.
    """

    def __init__(
        self,
        *,
        classes: list[str],
        category_ids: list[int],
        records: list[ImageRecord],
        transforms: Transforms | None = None,
    ) -> None:
        if len(classes) != len(category_ids):
            raise ValueError(f"classes ({len(classes)}) and category_ids ({len(category_ids)}) differ in length")
        self.classes: list[str] = list(classes)
        self.category_ids: list[int] = list(category_ids)
        self.records: list[ImageRecord] = list(records)
        self.image_ids: list[int] = [r.image_id for r in self.records]
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(images={len(self)}, classes={len(self.classes)})"

    def load_target(self, index: int) -> Target:
        """The untransformed target of image ``index`` without reading the image file."""
        r = self.records[index]
        return {
            "boxes": torch.tensor(r.boxes, dtype=torch.float32).reshape(-1, 4),  # (M, 4)
            "labels": torch.tensor(r.labels, dtype=torch.int64).reshape(-1),  # (M,)
            "ignore": torch.tensor(r.ignore, dtype=torch.bool).reshape(-1),  # (M,)
            "image_id": r.image_id,
            "orig_size": torch.tensor([r.height, r.width], dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        r = self.records[index]
        image = read_image(r.path)
        _, h, w = image.shape
        # Boxes are in the annotation's pixel frame; a different file size means they are wrong.
        if (h, w) != (r.height, r.width):
            raise DataError(f"{r.path}: image is {h}x{w} (HxW) but {r.source} says {r.height}x{r.width}")
        target = self.load_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def coco_gt(self) -> dict[str, Any]:
        """Ground truth as a COCO json dict for pycocotools (original category ids, xywh boxes).

        Ignored boxes become ``iscrowd=1``: COCOeval neither rewards nor penalises detections
        matched to them, which is how VOC 'difficult' objects are meant to be scored.
        """
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for r in self.records:
            images.append({"id": r.image_id, "width": r.width, "height": r.height, "file_name": r.file_name})
            for box, label, ignore in zip(r.boxes.tolist(), r.labels.tolist(), r.ignore.tolist(), strict=True):
                x1, y1, x2, y2 = box
                w, h = x2 - x1, y2 - y1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": r.image_id,
                        "category_id": self.category_ids[label],
                        "bbox": [x1, y1, w, h],
                        "area": w * h,
                        "iscrowd": int(ignore),
                    }
                )
        categories = [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.classes, strict=True)]
        return {"images": images, "annotations": annotations, "categories": categories}


def empty_boxes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes, labels and ignore flags of an image with no objects."""
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), np.zeros((0,), bool)
