"""The detector g = h . f . b of NAS-FCOS §3.1: backbone + decoder + FCOS core.

Letter legend: N images, H/W padded input size, K classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from torch import Tensor, nn

from nasfcos.backbones import build_backbone
from nasfcos.decoder import build_decoder
from nasfcos.fcos import FCOS, LevelOutputs


@dataclass(frozen=True)
class DetectorSpec:
    """Everything needed to rebuild a detector; stored in every checkpoint."""

    num_classes: int
    backbone: str = "resnet50"
    decoder: str = "fpn-fcos"  # preset name or canonical Arch string (nasfcos.space)
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

    def forward(self, images: Tensor) -> LevelOutputs:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        return self.decoder(self.backbone(images))

    def loss(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self.fcos.loss(self(images), targets)

    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        return self.fcos.postprocess(self(images), image_sizes)


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
