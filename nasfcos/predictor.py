"""A trained detector you call on your own images (issue #30): ``nasfcos.load(path)``.

    import nasfcos
    from PIL import Image

    detect = nasfcos.load("runs/demo/full/4783218e29f8/checkpoint.pt")
    (found,) = detect([Image.open("street.jpg")])
    print(found["names"][:5], found["scores"][:5], found["boxes"][:5])

The predictor resizes and normalises as evaluation does (the checkpoint's ``eval_min_size``
/ ``eval_max_size``; ImageNet mean and std), batches, runs ``Detector.predict`` and maps
the boxes back to each image's own pixels, as torchvision's detection models take images
of any size. It wraps the detector and leaves ``Detector.predict`` as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nasfcos.data.transforms import build_transforms, collate
from nasfcos.engine.checkpoint import checkpoint_path, detector_from_checkpoint
from nasfcos.evaluation.coco import to_original
from nasfcos.model.detector import Detector

if TYPE_CHECKING:
    from nasfcos.onnx_export import OnnxDetector

DEFAULT_BATCH = 8  # the evaluate stage's: the head's GroupNorm sees the batch's padding


class Predictor:
    """Images in, detections out: ``predictor(images) -> [{boxes, scores, labels, names}]``."""

    def __init__(
        self,
        model: Detector | OnnxDetector,
        *,
        classes: Sequence[str],
        category_ids: Sequence[int] | None = None,
        min_size: int = 800,
        max_size: int | None = 1333,
        device: str | torch.device = "cpu",
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.classes = list(classes)
        self.category_ids = list(category_ids) if category_ids is not None else list(range(len(self.classes)))  # the dataset's own ids
        self.batch_size = batch_size
        self.transforms = build_transforms(train=False, min_size=min_size, max_size=max_size)

    @torch.no_grad()
    def __call__(self, images: Any) -> list[dict[str, Any]]:
        """Detections of each image: ``boxes`` (D, 4) x1y1x2y2 in the image's pixels, ``scores``
        (D,), ``labels`` (D,) indices into ``classes``, ``names`` (D class names). ``images``: one
        or a list of PIL images, uint8 tensors (3, H, W) or float tensors (3, H, W) in [0, 1]."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        out: list[dict[str, Any]] = []
        for i in range(0, len(batch), self.batch_size):
            chunk = [as_tensor(im) for im in batch[i : i + self.batch_size]]
            tensor, targets = collate([self.transforms(im, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}) for im in chunk])
            sizes = [tuple(int(v) for v in t["size"]) for t in targets]
            for det, t, im in zip(self.model.predict(tensor.to(self.device), sizes), targets, chunk, strict=True):
                boxes = to_original(det["boxes"], t["scale"], (int(im.shape[-2]), int(im.shape[-1])))
                labels = det["labels"].cpu()
                out.append({"boxes": boxes, "scores": det["scores"].cpu(), "labels": labels, "names": [self.classes[int(k)] for k in labels]})
        return out


def as_tensor(image: Any) -> Tensor:
    """A (3, H, W) tensor from a PIL image or a tensor (uint8, or float in [0, 1]); one line naming what is wrong otherwise."""
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W), got shape {tuple(image.shape)}")
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise ValueError(f"an image tensor must be uint8 or float in [0, 1], got {image.dtype}")
        return image
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image.convert("RGB"))
    raise TypeError(f"an image must be a PIL image or a (3, H, W) tensor, got {type(image).__name__}")


RUNTIMES = ("torch", "onnx")


def load(path: str | Path, *, device: str | torch.device = "cpu", batch_size: int = DEFAULT_BATCH, runtime: str = "torch") -> Predictor:
    """A :class:`Predictor` from a nasfcos checkpoint (``checkpoint.pt``, or the training's
    folder holding it, e.g. ``runs/<id>/full/<arch_id>``) or a folder ``nasfcos export`` wrote.
    ``runtime="onnx"``: an exported folder's ``model.onnx`` in ONNX Runtime on the CPU
    (``nasfcos export --onnx``), with the same post-processing."""
    from nasfcos.export import CONFIG, WEIGHTS, detector_config, load_exported

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnx" and torch.device(device).type != "cpu":
        raise ValueError(f"runtime onnx runs on the CPU (the pinned onnxruntime has no CUDA provider), not {device}: use runtime torch there")
    path = Path(path)
    if (path / WEIGHTS).is_file() and not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path}: {WEIGHTS} without {CONFIG} (an export cut short?): run nasfcos export again")
    if (path / CONFIG).is_file():  # an exported folder
        model, config = load_exported(path)
        if runtime == "onnx":
            from nasfcos.onnx_export import OnnxDetector

            if "onnx" not in config:
                raise FileNotFoundError(f"{path}: no model.onnx in config.json (export with `nasfcos export --onnx`)")
            model = OnnxDetector(path / config["onnx"]["file"], model.fcos)
    elif runtime == "onnx":
        raise ValueError(f"{path}: runtime onnx reads a folder `nasfcos export --onnx` wrote, not a checkpoint")
    else:  # a checkpoint: the same fields an export would write
        model, ckpt = detector_from_checkpoint(checkpoint_path(path))
        config = detector_config(model, ckpt)
    size = config["input"]
    return Predictor(
        model, classes=config["classes"], category_ids=config["category_ids"], min_size=size["min_size"], max_size=size["max_size"], device=device, batch_size=batch_size
    )
