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
from contextlib import nullcontext
from collections.abc import Sequence
from math import prod

import torch
import torchvision.ops  # noqa: F401  (registers torch.ops.torchvision.*)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["complexity", "complexity_of", "count_call_macs", "count_macs", "count_params", "deform_conv2d_flop"]


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


def complexity_of(
    model: nn.Module, input_size: tuple[int, int] = (800, 1088), device: str | torch.device = "meta"
) -> dict[str, int]:
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
        decoder: a preset name (``fpn-fcos``, ``nas-fcos-fpn``, ``nas-fcos``)
            or canonical arch string (``nasfcos.space``).
        backbone, width, head_width, num_classes: the ``DetectorSpec`` fields
            (``head_width=None``: the head has the FPN's width).
        input_size: (H, W) of the single input image.
        device: ``"meta"`` (default) gives the same counts as ``"cpu"`` without
            computing anything.
    """
    from nasfcos.detector import DetectorSpec, build_detector

    spec = DetectorSpec(num_classes=num_classes, backbone=backbone, decoder=decoder, width=width, head_width=head_width)
    # On "meta" the detector is built shape-only: no memory, no weight init.
    with torch.device("meta") if torch.device(device).type == "meta" else nullcontext():
        model = build_detector(spec)
    return complexity_of(model, input_size, device=device)
