"""Frozen batch norm: FCOS's backbone norm (``FREEZE_CONV_BODY_AT: 2``), its conversion from
BatchNorm2d, and its folding into the preceding conv for inference."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBN


class FrozenBatchNorm2d(_TorchvisionFrozenBN):
    """torchvision's ``FrozenBatchNorm2d`` (same buffers, state dict and isinstance), computed
    by the fused inference ``batch_norm`` kernel: one pass over the activation instead of
    torchvision's ``x * scale + bias`` (two passes and a temporary). On CPU that was 12% of
    the R-50 detector's inference (benchmarks/RESULTS.md, "CPU inference"); the result
    equals torchvision's up to float rounding."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


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
            pairs = list(zip(names[:-1], names[1:], strict=True))
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
def to_frozen_bn(module: nn.Module) -> nn.Module:
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
        converted = to_frozen_bn(child)
        if converted is not child:
            setattr(module, child_name, converted)
    return module


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (e.g. ``features.3``) by ``module``."""
    parent_path, _, child_name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child_name, module)
