"""The detector g = h . f . b of NAS-FCOS §3.1: backbone + decoder + FCOS core.

Letter legend: N images, H/W padded input size, K classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from nasfcos.model.backbones import build_backbone
from nasfcos.model.decoder import build_decoder
from nasfcos.model.fcos import FCOS, LevelOutputs
from nasfcos.model.frozen_bn import fold_frozen_bn


@dataclass(frozen=True)
class DetectorSpec:
    """Everything needed to rebuild a detector; stored in every checkpoint."""

    num_classes: int
    backbone: str = "resnet50"
    decoder: str = "fpn-fcos"  # preset name or canonical Arch string (nasfcos.arch)
    width: int = 256  # FPN width
    head_width: int | None = None  # None: same as width (@128-256: width 128, head_width 256)
    variant: str = "paper"
    freeze_at: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


class Detector(nn.Module):
    """Backbone (images -> C2..C5), decoder (C2..C5 -> level outputs) and FCOS
    (losses / detections). ``forward`` returns the raw level outputs."""

    def __init__(self, *, backbone: nn.Module, decoder: nn.Module, fcos: FCOS) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.fcos = fcos
        # (weights key, backbone with its frozen norms folded) for predict; a list, so that
        # nn.Module does not register the copy (not in state_dict, parameters() or .to())
        self._folded: list = []

    def forward(self, images: Tensor) -> LevelOutputs:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        return self.decoder(self.backbone(images))

    def loss(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self.fcos.loss(self(images), targets)

    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]], *, fold_bn: bool = True) -> list[dict[str, Tensor]]:
        """Detections (``FCOS.postprocess``) for a batch. ``fold_bn``: run the backbone with its
        frozen BatchNorms folded into the convs before them (``fold_frozen_bn``; 7% of R-50's
        CPU inference; the same detections up to float rounding). The folded copy is made on
        the first call and again whenever a backbone tensor changed or moved."""
        if images.dim() != 4:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        backbone = self._folded_backbone() if fold_bn else self.backbone
        return self.fcos.postprocess(self.decoder(backbone(images)), image_sizes)

    def _folded_backbone(self) -> nn.Module:
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in (*self.backbone.parameters(), *self.backbone.buffers()))
        if not self._folded or self._folded[0] != key:
            with torch.inference_mode(False):  # plain tensors, usable outside inference mode too
                folded = fold_frozen_bn(self.backbone).eval().requires_grad_(False)
            self._folded[:] = [key, folded]
        return self._folded[1]


def build_detector(spec: DetectorSpec, *, backbone_weights: str | Path | None = None) -> Detector:
    """The one place a DetectorSpec becomes modules."""
    backbone = build_backbone(spec.backbone, weights=backbone_weights, freeze_at=spec.freeze_at)
    decoder = build_decoder(
        spec.decoder,
        in_channels=tuple(backbone.out_channels),
        num_classes=spec.num_classes,
        width=spec.width,
        head_width=spec.head_width,
    )
    return Detector(backbone=backbone, decoder=decoder, fcos=FCOS(num_classes=spec.num_classes, variant=spec.variant))
