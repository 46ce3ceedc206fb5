"""Decoders: modules mapping backbone features C2..C5 to per-level FCOS outputs.

NAS-FCOS §3.1 calls the FPN ``f`` and the prediction heads ``h`` together the
*decoder*; that is the part the search changes. Every decoder here has the same
contract, which the FCOS core (``nasfcos.fcos``) consumes:

    decoder([C2, C3, C4, C5]) -> [(cls (N,K,H,W), reg (N,4,H,W), ctr (N,1,H,W)) for P3..P7]

Letter legend: N images, C channels, K classes, H/W map size.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from nasfcos.fcos import LevelOutputs


def _gn(width: int) -> nn.GroupNorm:
    if width % 32:
        raise ValueError(f"GroupNorm(32) needs a width divisible by 32, got {width}")
    return nn.GroupNorm(32, width)


class FPN(nn.Module):
    """The FPN of FCOS: P3-P5 from C3-C5 by 1x1 laterals, top-down nearest
    upsampling and 3x3 output convs; P6 and P7 by 3x3 stride-2 convs from P5
    (ReLU before the second), as in the FCOS reference code (NAS-FCOS §3.2.1)."""

    def __init__(self, *, in_channels: tuple[int, int, int], width: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in in_channels)
        self.p6 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # c2_xavier_fill of the reference code
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """[C3, C4, C5] -> [P3, P4, P5, P6, P7]."""
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        top = laterals[-1]
        outs = [self.output[-1](top)]
        for i in range(len(laterals) - 2, -1, -1):
            top = laterals[i] + F.interpolate(top, size=laterals[i].shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](top))
        p6 = self.p6(outs[-1])
        p7 = self.p7(F.relu(p6))
        return outs + [p6, p7]


class FCOSHead(nn.Module):
    """The FCOS prediction head, shared across levels: separate classification
    and regression towers of ``num_convs`` conv3x3+GN(32)+ReLU, centerness
    predicted from the classification tower (FCOS v1, which NAS-FCOS uses),
    cls bias initialised to the prior probability."""

    def __init__(self, *, width: int, num_classes: int, num_convs: int = 4, prior_prob: float = 0.01) -> None:
        super().__init__()

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(num_convs):
                layers += [nn.Conv2d(width, width, 3, padding=1), _gn(width), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(width, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(width, 4, 3, padding=1)
        self.centerness = nn.Conv2d(width, 1, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, pyramid: list[Tensor]) -> LevelOutputs:
        outputs = []
        for p in pyramid:
            c, r = self.cls_tower(p), self.reg_tower(p)
            outputs.append((self.cls_logits(c), self.bbox_pred(r), self.centerness(c)))
        return outputs


class FPNFCOSDecoder(nn.Module):
    """The hand-designed FPN-FCOS decoder, the baseline NAS-FCOS compares with
    (Table 2 "FPN-FCOS @256"). Uses C3-C5; C2 is ignored."""

    def __init__(self, *, in_channels: tuple[int, int, int, int], num_classes: int, width: int = 256) -> None:
        super().__init__()
        self.fpn = FPN(in_channels=tuple(in_channels[1:]), width=width)
        self.head = FCOSHead(width=width, num_classes=num_classes)

    def forward(self, feats: list[Tensor]) -> LevelOutputs:
        if len(feats) != 4:
            raise ValueError(f"decoder expects [C2, C3, C4, C5], got {len(feats)} maps")
        return self.head(self.fpn(feats[1:]))


DECODERS = ("fpn-fcos",)


def build_decoder(name: str, *, in_channels: tuple[int, int, int, int], num_classes: int, width: int) -> nn.Module:
    """A decoder by name (the searched architectures join this in the search-space issue)."""
    if name == "fpn-fcos":
        return FPNFCOSDecoder(in_channels=in_channels, num_classes=num_classes, width=width)
    raise ValueError(f"unknown decoder {name!r}; known: {', '.join(DECODERS)}")
