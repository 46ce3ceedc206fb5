"""Detector assembly: backbone + FPN-FCOS decoder + FCOS core."""

import pytest
import torch
from torchvision.models.detection import fcos_resnet50_fpn

from nasfcos.model.decoder import build_decoder
from nasfcos.model.detector import DetectorSpec, build_detector


def _count(m):
    """Parameters, counting FrozenBatchNorm2d's affine weight/bias (buffers) as torchvision's BN params."""
    frozen = sum(b.numel() for n, b in m.named_buffers() if n.endswith((".weight", ".bias")))
    return sum(p.numel() for p in m.parameters()) + frozen


def test_fpn_fcos_r50_matches_torchvision_parameter_count():
    ours = build_detector(DetectorSpec(num_classes=80, backbone="resnet50", width=256))
    theirs = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80)  # plain BN without weights
    # Same backbone, FPN (P6/P7 from P5) and towers; we add the 5 per-level regression scales.
    assert _count(ours) == _count(theirs) + 5


def test_decoder_outputs_five_levels_with_expected_shapes():
    dec = build_decoder("fpn-fcos", in_channels=(16, 32, 64, 128), num_classes=3, width=32)
    feats = [torch.randn(2, c, 128 // s, 160 // s) for c, s in zip((16, 32, 64, 128), (4, 8, 16, 32), strict=True)]
    outs = dec(feats)
    assert len(outs) == 5
    for (cls, reg, ctr), s in zip(outs, (8, 16, 32, 64, 128), strict=True):
        H, W = -(-128 // s), -(-160 // s)
        assert cls.shape == (2, 3, H, W) and reg.shape == (2, 4, H, W) and ctr.shape == (2, 1, H, W)
    # the classification prior: sigmoid(bias) = 0.01
    assert torch.sigmoid(dec.head.cls_logits.bias).allclose(torch.full((3,), 0.01))


def test_detector_loss_backward_and_predict():
    torch.manual_seed(0)
    model = build_detector(DetectorSpec(num_classes=3, backbone="tiny", width=32))
    images = torch.randn(2, 3, 96, 128)
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    losses = model.loss(images, targets)
    assert set(losses) == {"cls", "reg", "ctr"}
    sum(losses.values()).backward()
    assert model.fcos.scales.grad is not None
    model.eval()
    dets = model.predict(images, [(96, 128), (90, 100)])
    assert len(dets) == 2
    for d, (H, W) in zip(dets, [(96, 128), (90, 100)], strict=True):
        assert d["boxes"].shape[1] == 4 and len(d["boxes"]) <= 100
        assert (d["boxes"][:, 2] <= W).all() and (d["boxes"][:, 3] <= H).all()


def test_bad_decoder_and_width_are_errors():
    with pytest.raises(ValueError, match="not a preset"):
        build_decoder("nope", in_channels=(1, 2, 3, 4), num_classes=3, width=32)
    with pytest.raises(ValueError, match="divisible by 32"):
        build_decoder("fpn-fcos", in_channels=(1, 2, 3, 4), num_classes=3, width=48)
    with pytest.raises(ValueError, match="images must be"):
        build_detector(DetectorSpec(num_classes=3, backbone="tiny", width=32))(torch.randn(3, 32, 32))
