"""Model complexity: parameters and multiply-accumulates (NAS-FCOS Table 2).

Table 2 of the paper reports "FLOPs (G)" and "Params (M)" of whole detectors
(backbone + decoder) at a 1088x800 input. Its "FLOPs" are multiply-accumulates
(MACs): FPN-FCOS R-50 counts ~170 G MACs at that size, twice that if every
multiply and every add were counted. This module counts both quantities so
that our rows can be put beside the paper's (``benchmarks/table2.py``;
``benchmarks/RESULTS.md`` explains the remaining differences).

What is counted
    Parameters: every ``nn.Parameter`` of the model, trainable or frozen
    (``trainable_only=True``: only those with ``requires_grad``). Buffers are
    not parameters: the backbones use ``FrozenBatchNorm2d``, whose affine
    weight/bias are buffers, as in maskrcnn-benchmark (the code the paper
    used), so backbone BN terms are not counted; BatchNorm/GroupNorm affine
    terms in the decoder are parameters and are counted.

    MACs of one forward pass on one (1, 3, H, W) image, eval mode, no grad,
    through ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per MAC; we
    divide by 2):

    * convolutions (``aten.convolution``): N * Cout * Hout * Wout * (Cin/groups) * kh * kw,
      so a depthwise conv counts Cin/groups = 1 and a dilated conv counts like
      an undilated one with the same kernel;
    * linear layers and matrix products (``aten.addmm``/``mm``/``bmm``/...): M * N * K;
    * modulated deformable convolutions (``torchvision::deform_conv2d``, a
      formula registered here): like an ordinary convolution of the same
      size, N * Cout * Hout * Wout * (Cin/groups) * kh * kw. The ordinary conv
      that predicts the offsets and mask is an ``aten.convolution`` and is
      counted by itself.

What is not counted
    Normalisation (BN, frozen BN, GroupNorm), activations, pooling,
    interpolation/upsampling, element-wise additions and products (residuals,
    FPN merges, ``psum``, the deformable conv's bilinear sampling and mask
    product), conv/linear biases, concatenation, and FCOS post-processing
    (box decoding, NMS), which is not part of ``Detector.forward``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from math import prod

import torch
import torchvision.ops  # noqa: F401  (registers torch.ops.torchvision.*)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "DecoderCost", "complexity", "complexity_of", "count_call_macs", "count_macs", "count_params", "decoder_cost", "deform_conv2d_flop",
]  # fmt: skip


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (buffers excluded); all of them, or
    only those with ``requires_grad`` when ``trainable_only``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def deform_conv2d_flop(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    offset_shape: Sequence[int],
    mask_shape: Sequence[int] | None,
    bias_shape: Sequence[int] | None,
    *args,
    out_shape: Sequence[int],
    **kwargs,
) -> int:
    """FLOPs (2 per MAC, FlopCounterMode's unit) of ``torchvision::deform_conv2d``:
    those of a convolution with the same weight and output shape.

    The op's arguments are (input, weight, offset, mask, bias, stride_h,
    stride_w, pad_h, pad_w, dil_h, dil_w, groups, offset_groups, use_mask);
    ``FlopCounterMode`` passes tensors as shapes and the output's shape as
    ``out_shape``. ``weight`` is (Cout, Cin/groups, kh, kw), the output
    (N, Cout, Hout, Wout).
    """
    return 2 * prod(out_shape) * prod(weight_shape[1:])


def _flop_counter() -> FlopCounterMode:
    # FlopCounterMode looks formulas up by OpOverloadPacket
    # (torch.ops.torchvision.deform_conv2d); keying only the overload
    # (.default) silently counts nothing. The overload is keyed as well so the
    # mode does not try to decompose it.
    op = torch.ops.torchvision.deform_conv2d
    return FlopCounterMode(display=False, custom_mapping={op: deform_conv2d_flop, op.default: deform_conv2d_flop})


def count_call_macs(module: nn.Module, *inputs) -> int:
    """MACs of ``module(*inputs)`` as called (no mode, device or grad changes)."""
    with _flop_counter() as counter:
        module(*inputs)
    flops = counter.get_total_flops()
    return flops // 2


def count_macs(
    model: nn.Module,
    input_size: tuple[int, int] = (800, 1088),
    device: str | torch.device = "cpu",
) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on a (1, 3, H, W) input.

    Args:
        model: any module taking an image batch (N, 3, H, W). It runs in eval
            mode under ``torch.no_grad`` (its train/eval flag is restored after).
        input_size: (H, W); the default (800, 1088) is the paper's "1088x800".
        device: ``"cpu"`` (or ``"cuda"``) moves ``model`` there and runs the
            real forward pass; ``"meta"`` counts the same ops on a shape-only
            copy of the model in a fraction of the time (the count depends
            only on shapes) and leaves ``model`` untouched.

    Returns:
        MACs (FlopCounterMode's FLOPs / 2); see the module docstring for what
        is and is not counted.
    """
    if len(input_size) != 2 or min(input_size) <= 0:
        raise ValueError(f"input_size must be two positive ints (H, W), got {input_size!r}")
    was_training = model.training
    if torch.device(device).type == "meta":
        model = copy.deepcopy(model)
    model.eval().to(device)
    images = torch.zeros(1, 3, *input_size, device=device)
    try:
        with torch.no_grad():
            return count_call_macs(model, images)
    finally:
        model.train(was_training)


def complexity_of(model: nn.Module, input_size: tuple[int, int] = (800, 1088), device: str | torch.device = "meta") -> dict[str, int]:
    """Parameters and MACs of a ``Detector`` (``backbone`` + ``decoder``) and of its decoder alone.

    Returns:
        ``params`` / ``trainable_params``: the whole model (``trainable_params``
        leaves out the frozen backbone stages, as the paper's counts do);
        ``macs``: one forward pass on a (1, 3, H, W) image;
        ``decoder_params``: the model's params minus the backbone's;
        ``decoder_macs``: the decoder applied to the backbone's features.
    """
    macs = count_macs(model, input_size, device=device)
    if torch.device(device).type == "meta":
        model = copy.deepcopy(model).to(device)
    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, *input_size, device=device))  # [C2..C5]
        decoder_macs = count_call_macs(model.decoder, feats)
    params = count_params(model)
    return {
        "params": params,
        "trainable_params": count_params(model, trainable_only=True),
        "macs": macs,
        "decoder_params": params - count_params(model.backbone),
        "decoder_macs": decoder_macs,
    }


def complexity(
    decoder: str,
    *,
    backbone: str = "resnet50",
    width: int = 256,
    head_width: int | None = None,
    num_classes: int = 80,
    input_size: tuple[int, int] = (800, 1088),
    device: str | torch.device = "meta",
) -> dict[str, int]:
    """:func:`complexity_of` a detector built from a ``DetectorSpec``.

    Args:
        decoder: a preset name (``fpn-fcos``, ``nas-fcos-fpn``, ``nas-fcos``, ``deformable-fpn-fcos``)
            or canonical arch string (``nasfcos.arch``).
        backbone, width, head_width, num_classes: the ``DetectorSpec`` fields
            (``head_width=None``: the head has the FPN's width).
        input_size: (H, W) of the single input image.
        device: ``"meta"`` (default) gives the same counts as ``"cpu"`` without
            computing anything.
    """
    from nasfcos.model.detector import DetectorSpec, build_detector

    spec = DetectorSpec(num_classes=num_classes, backbone=backbone, decoder=decoder, width=width, head_width=head_width)
    # On "meta" the detector is built shape-only: no memory, no weight init.
    with torch.device("meta") if torch.device(device).type == "meta" else nullcontext():
        model = build_detector(spec)
    return complexity_of(model, input_size, device=device)


# --------------------------------------------------------------------------
# Decoder cost per sampled arch (the search's cost constraint, benchmarks/strategies.py).
#
# Counting MACs by running a decoder costs ~0.3 s on CPU and ~1 s on the meta device
# (meta kernels are Python) per arch: too slow for a flow thread that must sample a few
# archs per second for 64 slots. Every op of the search space keeps its input's size and
# has MACs linear in its pixel count, so a decoder's MACs are the sum over its op calls
# of (MACs per pixel of that op) x (pixels it runs on); the per-pixel MACs and parameters
# of each op are measured once by the counter above on a real module (not re-derived
# here), and only the wiring (which op runs at which resolution, which layers are copied
# per level) is followed here. tests/test_complexity.py checks it equals the counted
# decoder on random archs of both head spaces.


@dataclass(frozen=True)
class DecoderCost:
    """Parameters and MACs (one sample) of a decoder at one geometry."""

    params: int
    macs: int


@functools.lru_cache(maxsize=None)
def _unit(kind: str, name: str, width: int, norm: str) -> tuple[int, int]:
    """(parameters, MACs per output pixel) of one op (``kind='op'``) or aggregation (``'agg'``)."""
    from nasfcos.model.ops import build_agg, build_op

    module = build_op(name, width, norm) if kind == "op" else build_agg(name, width, norm)
    x = torch.zeros(1, width, 4, 4)
    with torch.no_grad():
        macs = count_call_macs(module.eval(), *((x,) if kind == "op" else (x, x)))
    return count_params(module), macs // 16


def _conv(cin: int, cout: int, k: int, *, bias: bool, groups: int = 1) -> tuple[int, int]:
    """(parameters, MACs per output pixel) of a k x k convolution."""
    per_pixel = cout * (cin // groups) * k * k
    return per_pixel + (cout if bias else 0), per_pixel


def _half(hw: tuple[int, int]) -> tuple[int, int]:
    return ((hw[0] + 1) // 2, (hw[1] + 1) // 2)  # a 3x3 stride-2 conv with padding 1


@functools.lru_cache(maxsize=65536)
def _decoder_cost(arch_text: str, in_channels: tuple[int, ...], sizes: tuple[tuple[int, int], ...], width: int, num_classes: int) -> DecoderCost:
    from nasfcos.arch import AGGS, FPN_OPS, HEAD_OPS, NUM_BACKBONE_INPUTS, Arch, fpn_wiring

    arch = Arch.parse(arch_text)
    if arch.fpn is None or arch.head.kind == "fcos":  # not in the token spaces: count it
        from nasfcos.model.decoder import build_decoder

        with torch.device("meta"):
            decoder = build_decoder(arch, in_channels=in_channels, num_classes=num_classes, width=width)
            feats = [torch.zeros(1, c, *hw) for c, hw in zip(in_channels, sizes, strict=True)]
            with torch.no_grad():
                return DecoderCost(count_params(decoder), count_call_macs(decoder.eval(), feats))
    area = lambda hw: hw[0] * hw[1]  # noqa: E731
    params = macs = 0
    # FPN (nasfcos.model.decoder.SearchedFPN): 1x1 adapters for every C level (computed only where read)
    read = {i for b in arch.fpn for i in (b.id1, b.id2)}
    for i, (c, hw) in enumerate(zip(in_channels, sizes, strict=True)):
        p, m = _conv(c, width, 1, bias=False)
        params += p + 2 * width  # + BatchNorm
        macs += m * area(hw) if i in read else 0
    pool = list(sizes)  # resolution of each pool entry
    for b in arch.fpn:
        for idx, op in ((b.id1, b.op1), (b.id2, b.op2)):
            p, m = _unit("op", FPN_OPS[op], width, "bn")
            params, macs = params + p, macs + m * area(pool[idx])
        out = pool[b.id2] if area(pool[b.id1]) < area(pool[b.id2]) else pool[b.id1]  # nasfcos.model.ops.match_sizes
        p, m = _unit("agg", AGGS[b.agg], width, "bn")
        params, macs = params + p, macs + m * area(out)
        pool.append(out)
    assert len(pool) == NUM_BACKBONE_INPUTS + len(arch.fpn)
    fpn_wiring(arch.fpn)  # P3-P5 are resized to C3-C5: no MACs
    levels = list(sizes[1:])  # P3..P5, then P6, P7 (3x3 stride-2 convs with bias)
    for _ in range(2):
        levels.append(_half(levels[-1]))
        p, m = _conv(width, width, 3, bias=True)
        params, macs = params + p, macs + m * area(levels[-1])
    # head (nasfcos.model.decoder.PredictionHead): two towers; layers before `share` are copied per level
    h = arch.head
    if h.kind == "seq":
        layers = [[("op", HEAD_OPS[o])] for o in h.ops]
    else:
        layers = [[("op", HEAD_OPS[h.ops[0]])]] + [[("op", HEAD_OPS[b.op1]), ("op", HEAD_OPS[b.op2]), ("agg", AGGS[b.agg])] for b in h.blocks]
    pixels = sum(area(hw) for hw in levels)
    for k, layer in enumerate(layers):
        p = sum(_unit(kind, name, width, "gn")[0] for kind, name in layer)
        m = sum(_unit(kind, name, width, "gn")[1] for kind, name in layer)
        params += 2 * p * (len(levels) if k < arch.share else 1)
        macs += 2 * m * pixels
    for cout in (num_classes, 4, 1):  # class logits, box regression, centerness
        p, m = _conv(width, cout, 3, bias=True)
        params, macs = params + p, macs + m * pixels
    return DecoderCost(params, macs)


def decoder_cost(arch: "str | object", *, in_channels: Sequence[int], sizes: Sequence[Sequence[int]], width: int, num_classes: int) -> DecoderCost:
    """Parameters and MACs of the decoder of ``arch`` on one sample whose C2..C5 maps have
    ``in_channels`` channels and ``sizes`` (H, W): what the proxy's record counts
    (``nasfcos.engine.proxy.evaluate_arch``: ``params``, ``macs``), without building or running it.

    About 0.1 ms per arch (cached: ~1 us for an arch seen before) against ~0.3-1 s for a
    counted forward pass; archs outside the token spaces (the FCOS FPN or head) are counted.
    """
    return _decoder_cost(str(arch), tuple(int(c) for c in in_channels), tuple((int(h), int(w)) for h, w in sizes), int(width), int(num_classes))
