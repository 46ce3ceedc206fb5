"""Backbones: the network b that maps an image x to the feature pyramid C.

NAS-FCOS §3.1 writes the detector as a backbone b, a searched decoder (FPN f
and head h) and the FCOS targets; the backbone is *not* searched. It maps an
image to four feature maps C = [C2, C3, C4, C5] at strides 4, 8, 16, 32, which
the searched FPN consumes. Following FCOS (``FREEZE_CONV_BODY_AT: 2``), the
ImageNet backbones use frozen batch norm everywhere and freeze the stem and
res2 (``layer1``); the paper's proxy task and full training both do this.

Every builder uses random init; pre-trained weights come only from what the
user names: a local file (a torchvision ImageNet state dict, our own detector
checkpoint, or a backbone state dict) or a torchvision weight name such as
``ResNet50_Weights.IMAGENET1K_V1`` or ``FCOS_ResNet50_FPN_Weights.COCO_V1`` (the
backbone of torchvision's COCO FCOS; §4.1 starts from a COCO-trained FCOS). A
name is read from torchvision's cache (``TORCH_HOME``) and downloaded only when
absent there; nothing else is ever downloaded. Weights are checked key by key
before loading.

Shape legend:
    N  images in a batch
    C  channels
    H, W  input image height and width (pixels)
    Ck  feature map at stride 2**k, shape (N, C, H / 2**k, W / 2**k)
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import mobilenet_v2
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBN

__all__ = [
    "BACKBONE_NAMES",
    "NORMS",
    "Backbone",
    "MobileNetV2Backbone",
    "ResNetBackbone",
    "TinyBackbone",
    "build_backbone",
    "fold_frozen_bn",
    "load_backbone_weights",
    "torch_cache_path",
    "weight_name",
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

# torchvision weight enums whose state dict fits each backbone: its ImageNet classifier
# (our keys plus fc.* / classifier.*) and detectors built on it (our keys under backbone.body.).
_TORCHVISION_WEIGHTS: dict[str, tuple[str, ...]] = {
    "resnet50": ("ResNet50_Weights", "FCOS_ResNet50_FPN_Weights"),
    "resnet101": ("ResNet101_Weights",),
    "resnext101_32x8d": ("ResNeXt101_32X8D_Weights",),
    "mobilenet_v2": ("MobileNet_V2_Weights",),
}
# How a torchvision weight name is written: <enum class>.<member>.
_WEIGHT_NAME = re.compile(r"[A-Za-z]\w*_Weights\.\w+")
_NAME_HINT = (
    "write a torchvision weight name as Xxx_Weights.MEMBER, e.g. ResNet50_Weights.IMAGENET1K_V1"
)

# How many state-dict keys an error message shows before "...".
_KEYS_SHOWN = 3


class FrozenBatchNorm2d(_TorchvisionFrozenBN):
    """torchvision's ``FrozenBatchNorm2d`` (same buffers, state dict and isinstance), computed
    by the fused inference ``batch_norm`` kernel: one pass over the activation instead of
    torchvision's ``x * scale + bias`` (two passes and a temporary). On CPU that was 12% of
    the R-50 detector's inference (benchmarks/RESULTS.md, "CPU inference"); the result
    equals torchvision's up to float rounding."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


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
            raise ValueError(
                f"freeze_at={freeze_at} for backbone {self.name!r}: "
                f"must be in 0..{len(self.stage_paths)}"
            )
        for paths in self.stage_paths[:freeze_at]:
            for path in paths:
                module = _to_frozen_bn(self.get_submodule(path))
                _set_submodule(self, path, module)
                for param in module.parameters():
                    param.requires_grad_(False)


def _check_images(x: Tensor, name: str) -> None:
    """Fail early with a readable message instead of a conv shape error deep inside."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(
            f"backbone {name!r}: expected images of shape (N, 3, H, W), got {tuple(x.shape)}"
        )


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
    stage_paths = tuple(
        tuple(f"features.{i}" for i in range(start, end))
        for start, end in ((0, 2), (2, 4), (4, 7), (7, 14), (14, 18))
    )

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
            raise ValueError(
                f"TinyBackbone widths={tuple(widths)}: "
                "need 4 positive multiples of 8 (GroupNorm(8))"
            )
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


def load_backbone_weights(backbone: Backbone, weights: str | Path) -> None:
    """Load ``weights`` into ``backbone`` after checking every key and shape.

    ``weights`` is a local file or a torchvision weight name (see ``weight_name``).
    Accepted contents (read with ``torch.load(weights_only=True)``):
      * a torchvision ImageNet state dict (classifier keys such as ``fc.*`` are
        skipped), e.g. ``ResNet50_Weights.IMAGENET1K_V1``;
      * a torchvision detector state dict, whose ``backbone.body.*`` keys are
        taken with the prefix stripped, e.g. ``FCOS_ResNet50_FPN_Weights.COCO_V1``;
      * our checkpoint, ``{"model": detector_state_dict, ...}``, whose
        ``backbone.*`` keys are taken with the prefix stripped;
      * a state dict of the backbone itself (or of a detector, ``backbone.*``).
    BatchNorm ``num_batches_tracked`` entries are ignored on both sides, so the
    FrozenBatchNorm2d state of torchvision's detectors loads into either norm.

    Raises:
        FileNotFoundError: the file does not exist, or a named weight is not in
            the torch cache and cannot be downloaded (the message says where to
            place the file).
        ValueError: one line naming the weights when the name is unknown or for
            another backbone, torch cannot read the file, or keys or shapes do
            not match the backbone.
    """
    name = weight_name(weights)
    if name is not None:
        obj, source = _torchvision_state(name, backbone.name)
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: backbone weights file not found (or {_NAME_HINT})"
            )
        source = str(path)
        obj = _read(path)
    state = _backbone_state(obj, source)
    wanted = {
        key: value
        for key, value in state.items()
        if not key.endswith("num_batches_tracked")
        and not key.startswith(backbone.ignored_prefixes)
    }
    expected = {
        key: value
        for key, value in backbone.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }
    missing = [key for key in expected if key not in wanted]
    unexpected = [key for key in wanted if key not in expected]
    mismatched = [
        f"{key}: file {tuple(wanted[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in wanted and wanted[key].shape != value.shape
    ]
    problems = [
        _describe(missing, "missing key"),
        _describe(unexpected, "unexpected key"),
        _describe(mismatched, "shape mismatch", plural="shape mismatches"),
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        raise ValueError(f"{source}: {', '.join(problems)} — not a {backbone.name} checkpoint?")
    backbone.load_state_dict(wanted, strict=False)


def weight_name(weights: str | Path) -> str | None:
    """The torchvision weight name ``weights`` stands for, or None for a file path.

    ``Xxx_Weights.MEMBER`` is a name unless a file of that name exists, so a
    local file always wins.
    """
    text = str(weights)
    if _WEIGHT_NAME.fullmatch(text) and not Path(text).exists():
        return text
    return None


def torch_cache_path(url: str) -> Path:
    """Where torchvision's ``load_state_dict_from_url`` keeps ``url``'s file.

    ``<torch.hub.get_dir()>/checkpoints/<file name>``; ``TORCH_HOME`` moves it.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _torchvision_state(name: str, backbone_name: str) -> tuple[object, str]:
    """The state dict of torchvision weight ``name`` and a label for messages.

    Read from the torch cache; downloaded (hash-checked) only when absent, since
    the user named it. Checked against ``backbone_name`` before any download.
    """
    weights = _get_weight(name)
    fitting = _TORCHVISION_WEIGHTS.get(backbone_name, ())
    if type(weights).__name__ not in fitting:
        fits = ", ".join(f"{cls}.*" for cls in fitting) or "none in torchvision"
        raise ValueError(
            f"{name}: does not fit backbone {backbone_name!r} (weights that do: {fits})"
        )
    path = torch_cache_path(weights.url)
    source = f"{name} ({path})"
    if path.is_file():
        return _read(path, source), source
    try:
        obj = torch.hub.load_state_dict_from_url(
            weights.url,
            model_dir=str(path.parent),
            progress=True,
            check_hash=True,
            weights_only=True,
        )
    except Exception as error:  # offline: URLError; also HTTP errors, bad hash, disk full
        raise FileNotFoundError(
            f"{name}: not in the torch cache and cannot be downloaded ({_summarise(error)}); "
            f"place {path.name} (from {weights.url}) at {path}"
        ) from None
    return obj, source


def _get_weight(name: str) -> torchvision.models.WeightsEnum:
    """``torchvision.models.get_weight`` with a one-line error saying how to write a name."""
    try:
        return torchvision.models.get_weight(name)
    except KeyError:  # the enum exists, the member does not
        enum_name = name.split(".")[0]
        members = type(torchvision.models.get_weight(f"{enum_name}.DEFAULT")).__members__
        listed = ", ".join(f"{enum_name}.{member}" for member in members)
        raise ValueError(f"{name}: no such torchvision weight; {enum_name} has {listed}") from None
    except ValueError:
        raise ValueError(f"{name}: not a torchvision weight name; {_NAME_HINT}") from None


def _read(path: Path, source: str | None = None) -> object:
    """``torch.load(weights_only=True)`` with a one-line error naming ``source``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types (pickle, zip, runtime) for bad files
        raise ValueError(
            f"{source or path}: torch.load(weights_only=True) cannot read it ({_summarise(error)})"
        ) from error


def _backbone_state(obj: object, source: str) -> dict[str, Tensor]:
    """Pick the backbone's tensors out of whatever checkpoint layout ``obj`` has."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict, got {type(obj).__name__}")
    state = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    # torchvision detectors keep the trunk under backbone.body. (backbone.fpn. is their FPN);
    # our detectors under backbone.
    for prefix in ("backbone.body.", "backbone."):
        if any(isinstance(key, str) and key.startswith(prefix) for key in state):
            state = {
                key[len(prefix) :]: value
                for key, value in state.items()
                if isinstance(key, str) and key.startswith(prefix)
            }
            break
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(
                f"{source}: entry {key!r} is a {type(value).__name__}, "
                "not a tensor — not a state dict?"
            )
    return dict(state)


def _summarise(error: Exception, limit: int = 160) -> str:
    """One line from a torch.load error; its weights_only text is long and mostly advice."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:  # the actual cause follows this marker, the rest is boilerplate
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    detail = " ".join(text.split())
    if len(detail) > limit:
        detail = detail[: limit - 3] + "..."
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _describe(items: list[str], what: str, *, plural: str | None = None) -> str:
    """'3 missing keys (a, b, c, ...)' — a short one-line summary for error messages."""
    if not items:
        return ""
    noun = what if len(items) == 1 else plural or f"{what}s"
    shown = ", ".join(items[:_KEYS_SHOWN]) + (", ..." if len(items) > _KEYS_SHOWN else "")
    return f"{len(items)} {noun} ({shown})"


@torch.no_grad()
def fold_frozen_bn(module: nn.Module) -> nn.Module:
    """A copy of ``module`` for inference where each FrozenBatchNorm2d that directly follows a
    Conv2d (next in an ``nn.Sequential``, or ``convK`` -> ``bnK`` of one block as in
    torchvision's ResNet stem and bottlenecks) is folded into that conv's weight and bias and
    replaced by ``nn.Identity``: one pass over each activation fewer. The same function up to
    float rounding, since a frozen norm is a fixed per-channel affine map."""
    folded = copy.deepcopy(module)
    for parent in folded.modules():
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            pairs = list(zip(names[:-1], names[1:]))
        else:
            pairs = [(c, "bn" + c[4:]) for c in children if c.startswith("conv") and "bn" + c[4:] in children]
        for conv_name, bn_name in pairs:
            conv, bn = children[conv_name], children[bn_name]
            if type(conv) is not nn.Conv2d or not isinstance(bn, _TorchvisionFrozenBN):
                continue
            scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C,)
            bias = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
            setattr(parent, bn_name, nn.Identity())
            children[bn_name] = parent.get_submodule(bn_name)
    return folded


@torch.no_grad()
def _to_frozen_bn(module: nn.Module) -> nn.Module:
    """Return ``module`` with every BatchNorm2d replaced by an equivalent FrozenBatchNorm2d."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight)
            frozen.bias.copy_(module.bias)
        if module.running_mean is not None and module.running_var is not None:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for child_name, child in module.named_children():
        converted = _to_frozen_bn(child)
        if converted is not child:
            setattr(module, child_name, converted)
    return module


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (e.g. ``features.3``) by ``module``."""
    parent_path, _, child_name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child_name, module)
