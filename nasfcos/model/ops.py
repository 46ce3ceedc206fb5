"""Unary operations and aggregations of the NAS-FCOS search space (paper Table 1, §3.2).

One op table, :data:`OPS`, maps every op name of ``nasfcos.arch`` to a
constructor ``(channels, norm) -> nn.Module``; the search space and the decoder
builder both read it. Module details follow the released NAS-FCOS code: FPN
ops use BatchNorm, head ops GroupNorm(32); separable convs are depthwise k x k
then pointwise 1x1 (no biases), norm, ReLU; the deformable conv is modulated
(DCNv2) with 2 deformable groups, a bias, and a zero-initialised 3x3
offset/mask conv.

Letter legend: N images, C channels, H/W map size.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

NORMS = ("bn", "gn")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm (FPN ops, as released) or GroupNorm(32) (head ops)."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        if channels % 32:
            raise ValueError(f"GroupNorm(32) needs a width divisible by 32, got {channels}")
        return nn.GroupNorm(32, channels)
    raise ValueError(f"unknown norm {kind!r}; known: {', '.join(NORMS)}")


def resize_to(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize to (H, W) (align_corners=False, as released); no-op when equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def match_sizes(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Upsample the smaller of two maps to the larger one (Fig. 1)."""
    if x.shape[-2:] == y.shape[-2:]:
        return x, y
    if x.shape[-1] * x.shape[-2] < y.shape[-1] * y.shape[-2]:
        return resize_to(x, y.shape[-2:]), y
    return x, resize_to(y, x.shape[-2:])


class ConvNormReLU(nn.Sequential):
    """k x k conv (no bias) + norm + ReLU: the head's conv1x1 / conv3x3 ops."""

    def __init__(self, channels: int, kernel: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False),
            norm_layer(norm, channels),
            nn.ReLU(inplace=True),
        )


class SepConv(nn.Sequential):
    """Depthwise k x k (dilated) conv, pointwise 1x1 conv, norm, ReLU."""

    def __init__(self, channels: int, kernel: int, dilation: int, norm: str) -> None:
        pad = dilation * (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(channels, channels, kernel, padding=pad, dilation=dilation, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            norm_layer(norm, channels),
            nn.ReLU(inplace=True),
        )


class ModulatedDeformConv(nn.Module):
    """DCNv2 (Zhu et al. 2019) via ``torchvision.ops.deform_conv2d``: a 3x3 conv
    predicts offsets and masks (zero-initialised, so it starts as a plain conv
    with mask 0.5) for ``deformable_groups`` channel groups.

    ``compute_dtype`` (None: the input's; see :func:`set_deform_dtype`) runs the
    deformable conv itself in that dtype: torchvision's kernel is not cuDNN and under
    autocast runs in fp32, which made it most of a searched decoder's time. The output
    is cast back to the input's dtype, as torchvision's autocast wrapper does.

    ``out_channels`` (None: ``channels``) lets it change the width, as the 1x1 laterals of
    the deformable FPN (``deformable-fpn-fcos``) do; the ops of Table 1 keep it."""

    compute_dtype: torch.dtype | None = None

    def __init__(self, channels: int, kernel: int = 3, deformable_groups: int = 2, out_channels: int | None = None) -> None:
        super().__init__()
        self.kernel = kernel
        out_channels = channels if out_channels is None else out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        bound = 1.0 / math.sqrt(channels * kernel * kernel)
        nn.init.uniform_(self.weight, -bound, bound)
        self.offset_mask = nn.Conv2d(channels, deformable_groups * 3 * kernel * kernel, kernel, padding=kernel // 2)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)

    def forward(self, x: Tensor) -> Tensor:
        o1, o2, mask = torch.chunk(self.offset_mask(x), 3, dim=1)  # 2 x (N, dg*k*k, H, W) offsets, mask
        offset = torch.cat([o1, o2], dim=1)  # (N, 2*dg*k*k, H, W)
        dt = self.compute_dtype
        if dt is None:
            return deform_conv2d(x, offset, self.weight, self.bias, padding=self.kernel // 2, mask=torch.sigmoid(mask))
        with torch.autocast(device_type=x.device.type, enabled=False):  # torchvision's autocast would cast to fp32
            out = deform_conv2d(x.to(dt), offset.to(dt), self.weight.to(dt), self.bias.to(dt), padding=self.kernel // 2, mask=torch.sigmoid(mask).to(dt))
        return out.to(x.dtype)


# no bfloat16: torchvision's deform_conv2d has no bfloat16 kernel on CPU or CUDA
# ("deformable_im2col" not implemented for 'BFloat16'; H200, torchvision 0.26, 2026-12-04)
DEFORM_DTYPES = {"float32": None, "float16": torch.float16}


def deform_dtype_error(dtype: str) -> str | None:
    """Why ``dtype`` is not a deformable conv dtype ("must be one of ..."), or None."""
    if dtype in DEFORM_DTYPES:
        return None
    why = " (torchvision's deform_conv2d has no bfloat16 kernel)" if dtype == "bfloat16" else ""
    return f"must be one of {', '.join(DEFORM_DTYPES)}, got {dtype!r}{why}"


def set_deform_dtype(module: nn.Module, dtype: str) -> int:
    """Run every deformable conv in ``module`` in ``dtype`` (a key of :data:`DEFORM_DTYPES`;
    ``float32`` = the input's dtype, the default). Returns how many convs were set."""
    if (why := deform_dtype_error(dtype)) is not None:
        raise ValueError(f"deformable conv dtype {why}")
    convs = [m for m in module.modules() if isinstance(m, ModulatedDeformConv)]
    for m in convs:
        m.compute_dtype = DEFORM_DTYPES[dtype]
    return len(convs)


class DeformConvNormReLU(nn.Sequential):
    def __init__(self, channels: int, norm: str) -> None:
        super().__init__(ModulatedDeformConv(channels), norm_layer(norm, channels), nn.ReLU(inplace=True))


class ParamSum(nn.Module):
    """``psum``: a learnable per-channel weighted sum a*x + b*y."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.b = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x, y = match_sizes(x, y)
        return self.a * x + self.b * y


class ConcatReduce(nn.Module):
    """``cat``: concatenate, norm, ReLU, then a 1x1 conv back to the width. The
    1x1 conv is grouped (one group per output channel, mixing each channel of x
    with its counterpart in y) as in the released code."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            norm_layer(norm, 2 * channels),
            nn.ReLU(inplace=False),
            nn.Conv2d(2 * channels, channels, 1, groups=channels, bias=False),
        )

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x, y = match_sizes(x, y)
        return self.reduce(torch.cat([x, y], dim=1))  # (N, 2C, H, W) -> (N, C, H, W)


OpFactory = Callable[[int, str], nn.Module]

# The op table: every unary op and aggregation name of nasfcos.arch.
OPS: dict[str, OpFactory] = {
    "sep_conv_3x3": lambda c, norm: SepConv(c, 3, 1, norm),
    "sep_conv_3x3_dil3": lambda c, norm: SepConv(c, 3, 3, norm),
    "sep_conv_5x5_dil6": lambda c, norm: SepConv(c, 5, 6, norm),
    "skip_connect": lambda c, norm: nn.Identity(),
    "def_conv_3x3": lambda c, norm: DeformConvNormReLU(c, norm),
    "conv1x1": lambda c, norm: ConvNormReLU(c, 1, norm),
    "conv3x3": lambda c, norm: ConvNormReLU(c, 3, norm),
}
AGG_OPS: dict[str, OpFactory] = {"psum": ParamSum, "cat": ConcatReduce}


def build_op(name: str, channels: int, norm: str) -> nn.Module:
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; known: {', '.join(OPS)}")
    return OPS[name](channels, norm)


def build_agg(name: str, channels: int, norm: str) -> nn.Module:
    if name not in AGG_OPS:
        raise ValueError(f"unknown aggregation {name!r}; known: {', '.join(AGG_OPS)}")
    return AGG_OPS[name](channels, norm)
