"""Backbones: the network b that maps an image x to the feature pyramid C.

NAS-FCOS §3.1 writes the detector as a backbone b, a searched decoder (FPN f
and head h) and the FCOS targets; the backbone is *not* searched. It maps an
image to four feature maps C = [C2, C3, C4, C5] at strides 4, 8, 16, 32, which
the searched FPN consumes. Following FCOS (``FREEZE_CONV_BODY_AT: 2``), the
ImageNet backbones use frozen batch norm everywhere and freeze the stem and
res2 (``layer1``); the paper's proxy task and full training both do this
(``nasfcos.model.frozen_bn``). Every builder uses random init; pre-trained weights
come only from what the user names (``nasfcos.model.weights``).

Shape legend:
    N  images in a batch
    C  channels
    H, W  input image height and width (pixels)
    Ck  feature map at stride 2**k, shape (N, C, H / 2**k, W / 2**k)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn
from torchvision.models import mobilenet_v2
from torchvision.models.resnet import Bottleneck, ResNet

from nasfcos.model.frozen_bn import FrozenBatchNorm2d, set_submodule, to_frozen_bn
from nasfcos.model.weights import load_backbone_weights

__all__ = [
    "BACKBONE_NAMES",
    "NORMS",
    "Backbone",
    "MobileNetV2Backbone",
    "ResNetBackbone",
    "TinyBackbone",
    "build_backbone",
]

# name -> (blocks per stage, groups, width_per_group) for torchvision ResNet(Bottleneck, ...).
# torchvision ships only resnext101_32x8d as a builder; 32x4d (the X-101 of the
# paper's Table 2 caption) is the same class with width_per_group=4. Table 2's X-101
# numbers are those of 32x8d (the official FCOS / NAS-FCOS X-101 models), so both exist.
_RESNET_LAYOUTS: dict[str, tuple[tuple[int, int, int, int], int, int]] = {
    "resnet50": ((3, 4, 6, 3), 1, 64),
    "resnet101": ((3, 4, 23, 3), 1, 64),
    "resnext101_32x4d": ((3, 4, 23, 3), 32, 4),
    "resnext101_32x8d": ((3, 4, 23, 3), 32, 8),
}
# Names of the feature maps every backbone returns, in order (strides 4, 8, 16, 32).
LEVELS: tuple[str, ...] = ("C2", "C3", "C4", "C5")
BACKBONE_NAMES: tuple[str, ...] = (*_RESNET_LAYOUTS, "mobilenet_v2", "tiny")
NORMS: tuple[str, ...] = ("frozen_bn", "bn")


class Backbone(nn.Module):
    """Interface of every backbone: image in, [C2, C3, C4, C5] out (NAS-FCOS §3.1).

    Subclasses keep torchvision's attribute names so that a torchvision
    ImageNet state dict loads without renaming keys.

    Attributes:
        name: the ``build_backbone`` name this was built from.
        out_channels: channels of C2..C5.
        strides: strides of C2..C5 with respect to the input image.
        ignored_prefixes: state-dict key prefixes of parts of the torchvision
            model that the backbone drops (the classifier), skipped on load.
        stage_paths: attribute paths of the stem and of the stages ending in
            C2..C5; ``freeze(k)`` freezes the first k entries.
    """

    name: str
    out_channels: tuple[int, int, int, int]
    strides: tuple[int, int, int, int] = (4, 8, 16, 32)
    ignored_prefixes: tuple[str, ...] = ()
    stage_paths: tuple[tuple[str, ...], ...] = ()

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return [C2, C3, C4, C5] for images x of shape (N, 3, H, W)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def freeze(self, freeze_at: int) -> None:
        """Freeze the stem (1) and stages up to res{freeze_at} (FCOS FREEZE_CONV_BODY_AT).

        Frozen stages get requires_grad=False and any trainable BatchNorm2d in
        them becomes FrozenBatchNorm2d, so their running statistics stop moving
        too (as detectron2 does).
        """
        if not 0 <= freeze_at <= len(self.stage_paths):
            raise ValueError(f"freeze_at={freeze_at} for backbone {self.name!r}: must be in 0..{len(self.stage_paths)}")
        for paths in self.stage_paths[:freeze_at]:
            for path in paths:
                module = to_frozen_bn(self.get_submodule(path))
                set_submodule(self, path, module)
                for param in module.parameters():
                    param.requires_grad_(False)


def _check_images(x: Tensor, name: str) -> None:
    """Fail early with a readable message instead of a conv shape error deep inside."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"backbone {name!r}: expected images of shape (N, 3, H, W), got {tuple(x.shape)}")


class ResNetBackbone(Backbone):
    """ResNet / ResNeXt trunk (torchvision) with C2..C5 = layer1..layer4 outputs.

    The stem (conv1, bn1, maxpool) and layers keep torchvision's names; avgpool
    and fc are dropped.
    """

    ignored_prefixes = ("fc.",)
    stage_paths = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))

    def __init__(
        self,
        *,
        name: str,
        layers: Sequence[int],
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: type[nn.Module] = FrozenBatchNorm2d,
    ) -> None:
        super().__init__()
        trunk = ResNet(
            Bottleneck,
            list(layers),
            groups=groups,
            width_per_group=width_per_group,
            norm_layer=norm_layer,
        )
        self.name = name
        self.conv1 = trunk.conv1
        self.bn1 = trunk.bn1
        self.relu = trunk.relu
        self.maxpool = trunk.maxpool
        self.layer1 = trunk.layer1
        self.layer2 = trunk.layer2
        self.layer3 = trunk.layer3
        self.layer4 = trunk.layer4
        self.out_channels = (256, 512, 1024, 2048)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return [C2, C3, C4, C5] for images x of shape (N, 3, H, W)."""
        _check_images(x, self.name)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4)
        c2 = self.layer1(x)  # (N, 256, H/4, W/4)
        c3 = self.layer2(c2)  # (N, 512, H/8, W/8)
        c4 = self.layer3(c3)  # (N, 1024, H/16, W/16)
        c5 = self.layer4(c4)  # (N, 2048, H/32, W/32)
        return [c2, c3, c4, c5]


class MobileNetV2Backbone(Backbone):
    """MobileNetV2 ``features[:18]`` (torchvision) split at strides 4/8/16/32.

    ``features[18]`` (the 1x1 conv to 1280 channels) and the classifier are
    dropped. Stages for freezing: stem = features[0:2] (stride 2), then
    features[2:4] → C2 (24ch), [4:7] → C3 (32ch), [7:14] → C4 (96ch),
    [14:18] → C5 (320ch).
    """

    ignored_prefixes = ("classifier.", "features.18.")
    # Index one past the last block of each of C2..C5 in ``features``.
    _STAGE_ENDS = (4, 7, 14, 18)
    stage_paths = tuple(tuple(f"features.{i}" for i in range(start, end)) for start, end in ((0, 2), (2, 4), (4, 7), (7, 14), (14, 18)))

    def __init__(self, *, norm_layer: type[nn.Module] = FrozenBatchNorm2d) -> None:
        super().__init__()
        trunk = mobilenet_v2(weights=None, norm_layer=norm_layer)
        self.name = "mobilenet_v2"
        # Same indices as torchvision, so "features.3.conv.0.0.weight" etc. load as-is.
        self.features = nn.Sequential(*list(trunk.features)[: self._STAGE_ENDS[-1]])
        self.out_channels = (24, 32, 96, 320)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return [C2, C3, C4, C5] for images x of shape (N, 3, H, W)."""
        _check_images(x, self.name)
        outs: list[Tensor] = []
        for index, block in enumerate(self.features):
            x = block(x)
            if index + 1 in self._STAGE_ENDS:
                outs.append(x)  # (N, Ck, H/2**k, W/2**k)
        return outs


def _conv_gn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 conv + GroupNorm + ReLU; GN so tiny batches train the same as they evaluate."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(8, out_channels),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(Backbone):
    """Small CNN (~0.3 M params) for CPU demos and tests, trained from scratch.

    Not in the paper: it stands in for ResNet-50 where no GPU or ImageNet
    weights are available. Each stage is a stride-2 conv then a stride-1 conv
    (conv-GN-ReLU), widths 16/32/64/128 at strides 4/8/16/32. Nothing is frozen.
    """

    stage_paths = (("stem",), ("layer1",), ("layer2",), ("layer3",), ("layer4",))

    def __init__(self, *, widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        if len(widths) != 4 or any(w <= 0 or w % 8 for w in widths):
            raise ValueError(f"TinyBackbone widths={tuple(widths)}: need 4 positive multiples of 8 (GroupNorm(8))")
        self.name = "tiny"
        self.stem = _conv_gn_relu(3, widths[0], stride=2)
        stages = []
        in_channels = widths[0]
        for width in widths:
            stages.append(
                nn.Sequential(
                    _conv_gn_relu(in_channels, width, stride=2),
                    _conv_gn_relu(width, width, stride=1),
                )
            )
            in_channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = (widths[0], widths[1], widths[2], widths[3])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return [C2, C3, C4, C5] for images x of shape (N, 3, H, W)."""
        _check_images(x, self.name)
        x = self.stem(x)  # (N, C2, H/2, W/2)
        c2 = self.layer1(x)  # (N, C2, H/4, W/4)
        c3 = self.layer2(c2)  # (N, C3, H/8, W/8)
        c4 = self.layer3(c3)  # (N, C4, H/16, W/16)
        c5 = self.layer4(c4)  # (N, C5, H/32, W/32)
        return [c2, c3, c4, c5]


def _norm_layer(norm: str) -> type[nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    raise ValueError(f"norm={norm!r}: must be one of {', '.join(NORMS)}")


def build_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    freeze_at: int = 2,
    norm: str = "frozen_bn",
) -> Backbone:
    """Build backbone ``name``, optionally load weights, then freeze.

    Args:
        name: one of ``BACKBONE_NAMES``.
        weights: a local file or a torchvision weight name (see
            ``load_backbone_weights``); None keeps random init.
        freeze_at: 0 freezes nothing, 1 the stem, 2 stem + res2 (FCOS default),
            up to 5 (everything). Ignored by ``tiny``, which trains all layers.
        norm: ``frozen_bn`` (FCOS) or ``bn`` (trainable BatchNorm2d outside the
            frozen stages). Ignored by ``tiny``, which always uses GroupNorm.

    Returns:
        The backbone; ``backbone(x)`` maps (N, 3, H, W) to [C2, C3, C4, C5].

    Example:
        >>> b = build_backbone("tiny")
        >>> [tuple(c.shape) for c in b(torch.zeros(1, 3, 64, 64))]
        [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
    """
    norm_layer = _norm_layer(norm)
    backbone: Backbone
    if name in _RESNET_LAYOUTS:
        layers, groups, width_per_group = _RESNET_LAYOUTS[name]
        backbone = ResNetBackbone(
            name=name,
            layers=layers,
            groups=groups,
            width_per_group=width_per_group,
            norm_layer=norm_layer,
        )
    elif name == "mobilenet_v2":
        backbone = MobileNetV2Backbone(norm_layer=norm_layer)
    elif name == "tiny":
        backbone = TinyBackbone()
        freeze_at = 0
    else:
        raise ValueError(f"backbone name={name!r}: must be one of {', '.join(BACKBONE_NAMES)}")
    if weights is not None:
        load_backbone_weights(backbone, weights)
    # Freeze after loading so BatchNorm2d -> FrozenBatchNorm2d keeps the loaded statistics.
    backbone.freeze(freeze_at)
    return backbone
