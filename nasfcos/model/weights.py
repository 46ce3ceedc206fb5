"""Backbone weights: what the user names (a local file or a torchvision weight name) -> checked tensors.

Every builder uses random init; pre-trained weights come only from what the user
names: a local file (a torchvision ImageNet state dict, our own detector checkpoint,
or a backbone state dict) or a torchvision weight name such as
``ResNet50_Weights.IMAGENET1K_V1`` or ``FCOS_ResNet50_FPN_Weights.COCO_V1`` (the
backbone of torchvision's COCO FCOS; §4.1 starts from a COCO-trained FCOS). A name is
read from torchvision's cache (``TORCH_HOME``) and downloaded only when absent there;
nothing else is ever downloaded. Weights are checked key by key before loading.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

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


_NAME_HINT = "write a torchvision weight name as Xxx_Weights.MEMBER, e.g. ResNet50_Weights.IMAGENET1K_V1"


# How many state-dict keys an error message shows before "...".
_KEYS_SHOWN = 3


def load_backbone_weights(backbone: nn.Module, weights: str | Path) -> None:
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
            raise FileNotFoundError(f"{path}: backbone weights file not found (or {_NAME_HINT})")
        source = str(path)
        obj = _read(path)
    state = _backbone_state(obj, source)
    wanted = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked") and not key.startswith(backbone.ignored_prefixes)}
    expected = {key: value for key, value in backbone.state_dict().items() if not key.endswith("num_batches_tracked")}
    missing = [key for key in expected if key not in wanted]
    unexpected = [key for key in wanted if key not in expected]
    mismatched = [f"{key}: file {tuple(wanted[key].shape)} vs model {tuple(value.shape)}" for key, value in expected.items() if key in wanted and wanted[key].shape != value.shape]
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
    weights = get_weight(name)
    fitting = _TORCHVISION_WEIGHTS.get(backbone_name, ())
    if type(weights).__name__ not in fitting:
        fits = ", ".join(f"{cls}.*" for cls in fitting) or "none in torchvision"
        raise ValueError(f"{name}: does not fit backbone {backbone_name!r} (weights that do: {fits})")
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
    except Exception as error:  # noqa: BLE001 - offline: URLError; also HTTP errors, bad hash, disk full
        raise FileNotFoundError(f"{name}: not in the torch cache and cannot be downloaded ({_summarise(error)}); place {path.name} (from {weights.url}) at {path}") from None
    return obj, source


def get_weight(name: str) -> torchvision.models.WeightsEnum:
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
        raise ValueError(f"{source or path}: torch.load(weights_only=True) cannot read it ({_summarise(error)})") from error


def _backbone_state(obj: object, source: str) -> dict[str, Tensor]:
    """Pick the backbone's tensors out of whatever checkpoint layout ``obj`` has."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict, got {type(obj).__name__}")
    state = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    # torchvision detectors keep the trunk under backbone.body. (backbone.fpn. is their FPN);
    # our detectors under backbone.
    for prefix in ("backbone.body.", "backbone."):
        if any(isinstance(key, str) and key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items() if isinstance(key, str) and key.startswith(prefix)}
            break
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor — not a state dict?")
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
