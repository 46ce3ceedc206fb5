"""Decoders built from an :class:`~nasfcos.arch.Arch`: FPN ``f`` + prediction heads ``h``.

NAS-FCOS §3.1 calls the FPN and the heads together the *decoder*; that is the
part the search changes. Every decoder has the same contract, which the FCOS
core (``nasfcos.model.fcos``) consumes::

    decoder([C2, C3, C4, C5]) -> [(cls (N,K,H,W), reg (N,4,H,W), ctr (N,1,H,W)) for P3..P7]

Letter legend: N images, C channels, K classes, H/W map size, L levels (5).
"""

from __future__ import annotations

import copy
import math

import torch.nn.functional as F
from torch import Tensor, nn

from nasfcos.arch import AGGS, FPN_OPS, HEAD_OPS, NUM_BACKBONE_INPUTS, Arch, Block, Head, fpn_wiring, resolve
from nasfcos.model.fcos import LevelOutputs
from nasfcos.model.ops import ModulatedDeformConv, build_agg, build_op, norm_layer, resize_to

NUM_LEVELS = 5  # P3..P7


class P6P7(nn.Module):
    """P6 = conv3x3/s2(P5), P7 = conv3x3/s2(ReLU(P6)), as FCOS (§3.2.1)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        for m in (self.p6, self.p7):  # c2_xavier_fill of the reference code
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)

    def forward(self, p5: Tensor) -> list[Tensor]:
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """The FPN of FCOS: P3-P5 from C3-C5 by 1x1 laterals, top-down nearest
    upsampling and 3x3 output convs; P6/P7 from P5.

    ``deform``: Deformable-FPN-FCOS (§4.4.2): the laterals and output convs are
    modulated deformable convs (DCNv2, 2 deformable groups, an offset/mask conv of their
    own kernel size, zero-initialised), as the released ``R-50-Deformable_FPN-DENSEBOX``
    builds them; P6/P7 and the head stay plain (docs/fidelity.md says why)."""

    def __init__(self, *, in_channels: tuple[int, int, int, int], width: int, deform: bool = False) -> None:
        super().__init__()
        if deform:
            self.lateral = nn.ModuleList(ModulatedDeformConv(c, 1, out_channels=width) for c in in_channels[1:])
            self.output = nn.ModuleList(ModulatedDeformConv(width, 3) for _ in in_channels[1:])
        else:
            self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels[1:])
            self.output = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in in_channels[1:])
        for m in [*self.lateral, *self.output]:  # the released code's init of either kind
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)
        self.extra = P6P7(width)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats[1:], strict=True)]  # C3..C5
        top = laterals[-1]
        outs = [self.output[-1](top)]
        for i in range(len(laterals) - 2, -1, -1):
            top = laterals[i] + F.interpolate(top, size=laterals[i].shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](top))
        return outs + self.extra(outs[-1])


class Cell(nn.Module):
    """Basic block (Fig. 1): agg(op1(x1), op2(x2))."""

    def __init__(self, block: Block, *, ops: tuple[str, ...], width: int, norm: str) -> None:
        super().__init__()
        self.op1 = build_op(ops[block.op1], width, norm)
        self.op2 = build_op(ops[block.op2], width, norm)
        self.agg = build_agg(AGGS[block.agg], width, norm)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        o1, o2 = self.op1(x1), self.op2(x2)
        return o1, o2, self.agg(o1, o2)


class SearchedFPN(nn.Module):
    """The FPN search space of §3.2.1.

    The pool starts as C2..C5 adapted to ``width`` (1x1 conv + BN + ReLU); each
    of the 7 cells appends its output. Unread cell outputs are collected: the
    last three give P5, P4, P3, the others are added to each of them (eq. 1),
    and each sum is resized to its C level's resolution. Only pool entries
    that some cell or output reads are computed (C2 usually is not).
    """

    def __init__(self, *, blocks: tuple[Block, ...], in_channels: tuple[int, int, int, int], width: int) -> None:
        super().__init__()
        self.blocks = blocks
        self.adapt = nn.ModuleList(nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)) for c in in_channels)
        self.cells = nn.ModuleList(Cell(b, ops=FPN_OPS, width=width, norm="bn") for b in blocks)
        self.wiring = fpn_wiring(blocks)
        self.extra = P6P7(width)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        pool: list[Tensor | None] = [None] * NUM_BACKBONE_INPUTS

        def get(i: int) -> Tensor:
            if pool[i] is None:
                pool[i] = self.adapt[i](feats[i])
            return pool[i]

        for cell, b in zip(self.cells, self.blocks, strict=True):
            pool.append(cell(get(b.id1), get(b.id2))[2])
        w = self.wiring
        outs = []
        for idx, level in ((w.p3, 1), (w.p4, 2), (w.p5, 3)):
            x = get(idx)
            for e in w.extra:
                x = x + resize_to(get(e), x.shape[-2:])
            outs.append(resize_to(x, feats[level].shape[-2:]))
        return outs + self.extra(outs[-1])


def _layer_modules(head: Head, width: int) -> list[nn.Module]:
    """One module per head layer (the unit of weight sharing)."""
    if head.kind == "fcos":
        layers = []
        for _ in range(head.num_layers):
            conv = nn.Conv2d(width, width, 3, padding=1)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            layers.append(nn.Sequential(conv, norm_layer("gn", width), nn.ReLU(inplace=True)))
        return layers
    if head.kind == "seq":
        return [build_op(HEAD_OPS[o], width, "gn") for o in head.ops]
    return [build_op(HEAD_OPS[head.ops[0]], width, "gn")] + [Cell(b, ops=HEAD_OPS, width=width, norm="gn") for b in head.blocks]


class Tower(nn.Module):
    """One branch (classification or regression) of a head; layers before
    ``share`` have a copy per level, the rest are shared across levels (§3.2.3)."""

    def __init__(self, head: Head, *, share: int, width: int, num_levels: int = NUM_LEVELS) -> None:
        super().__init__()
        self.kind = head.kind
        self.blocks = head.blocks
        layers = _layer_modules(head, width)
        self.layers = nn.ModuleList(nn.ModuleList(copy.deepcopy(m) for _ in range(num_levels)) if k < share else m for k, m in enumerate(layers))
        self.share = share

    def _layer(self, k: int, level: int) -> nn.Module:
        return self.layers[k][level] if k < self.share else self.layers[k]

    def forward(self, p: Tensor, level: int) -> Tensor:
        if self.kind != "dag":
            for k in range(len(self.layers)):
                p = self._layer(k, level)(p)
            return p
        pool = [p, self._layer(0, level)(p)]
        for t, b in enumerate(self.blocks, start=1):
            pool.extend(self._layer(t, level)(pool[b.id1], pool[b.id2]))
        return pool[-1]


class PredictionHead(nn.Module):
    """Classification and regression towers of the same structure, then shared
    3x3 predictors: class logits (prior 0.01), box regression and centerness
    (on the classification branch, as FCOS v1 / the released NAS-FCOS)."""

    def __init__(self, head: Head, *, share: int, width: int, num_classes: int, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.cls_tower = Tower(head, share=share, width=width)
        self.reg_tower = Tower(head, share=share, width=width)
        self.cls_logits = nn.Conv2d(width, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(width, 4, 3, padding=1)
        self.centerness = nn.Conv2d(width, 1, 3, padding=1)
        for m in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, pyramid: list[Tensor]) -> LevelOutputs:
        outputs = []
        for level, p in enumerate(pyramid):
            c, r = self.cls_tower(p, level), self.reg_tower(p, level)
            outputs.append((self.cls_logits(c), self.bbox_pred(r), self.centerness(c)))
        return outputs


class Decoder(nn.Module):
    """FPN + heads for any Arch. With different FPN and head widths (@128-256)
    a shared 1x1 conv maps each pyramid level to the head width."""

    def __init__(
        self,
        arch: Arch | str,
        *,
        in_channels: tuple[int, int, int, int],
        num_classes: int,
        width: int = 256,
        head_width: int | None = None,
    ) -> None:
        super().__init__()
        self.arch = resolve(arch)
        head_width = width if head_width is None else head_width
        if self.arch.fpn is None:
            self.fpn: nn.Module = FPN(in_channels=in_channels, width=width, deform=self.arch.deform_fpn)
        else:
            self.fpn = SearchedFPN(blocks=self.arch.fpn, in_channels=in_channels, width=width)
        self.bridge = nn.Conv2d(width, head_width, 1) if head_width != width else nn.Identity()
        self.head = PredictionHead(self.arch.head, share=self.arch.share, width=head_width, num_classes=num_classes)

    def forward(self, feats: list[Tensor]) -> LevelOutputs:
        if len(feats) != NUM_BACKBONE_INPUTS:
            raise ValueError(f"decoder expects [C2, C3, C4, C5], got {len(feats)} maps")
        return self.head([self.bridge(p) for p in self.fpn(feats)])


def build_decoder(arch: Arch | str, *, in_channels: tuple[int, int, int, int], num_classes: int, width: int, head_width: int | None = None) -> Decoder:
    """A decoder from an Arch, canonical string or preset name (``nasfcos.arch.PRESETS``)."""
    return Decoder(arch, in_channels=in_channels, num_classes=num_classes, width=width, head_width=head_width)
