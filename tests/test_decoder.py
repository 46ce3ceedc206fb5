"""Ops and decoders built from an Arch: shapes, gradients, sharing, the deformable conv."""

import numpy as np
import pytest
import torch

from nasfcos.arch import PRESETS, Arch, Head
from nasfcos.model.decoder import Decoder, Tower, _layer_modules
from nasfcos.model.ops import OPS, ConcatReduce, ModulatedDeformConv, ParamSum

IN_CHANNELS = (8, 16, 24, 32)


def _feats(n=2, size=64):
    """C2..C5 of a size x size image (strides 4..32)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, c, size // s, size // s, generator=g) for c, s in zip(IN_CHANNELS, (4, 8, 16, 32), strict=True)]


def _count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_every_op_keeps_shape(name, norm):
    x = torch.randn(2, 32, 9, 11)
    assert OPS[name](32, norm)(x).shape == x.shape


def test_deformable_conv_starts_as_half_a_plain_conv():
    """Zero-initialised offset/mask conv: offsets 0 and masks sigmoid(0) = 0.5, so the
    output is 0.5 * conv(x) + bias."""
    torch.manual_seed(0)
    m = ModulatedDeformConv(8)
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(1, 8, 7, 7)
    expected = 0.5 * torch.nn.functional.conv2d(x, m.weight, padding=1) + m.bias.view(1, -1, 1, 1)
    assert torch.allclose(m(x), expected, atol=1e-5)
    # 2 deformable groups x 3 (dx, dy, mask) x 9 taps = 54 offset/mask channels
    assert m.offset_mask.out_channels == 54
    # learned offsets change the result, i.e. the offsets really reach deform_conv2d
    with torch.no_grad():
        m.offset_mask.bias.fill_(0.7)
    assert not torch.allclose(m(x), expected, atol=1e-3)


def test_deformable_conv_can_change_the_width_with_a_1x1_kernel():
    """The deformable FPN's laterals: Cin -> C, 1x1, an offset/mask conv of 2 x 3 x 1 = 6 channels."""
    torch.manual_seed(0)
    m = ModulatedDeformConv(8, 1, out_channels=5)
    with torch.no_grad():
        m.bias.normal_()
    assert m.weight.shape == (5, 8, 1, 1) and m.offset_mask.out_channels == 6 and m.offset_mask.kernel_size == (1, 1)
    x = torch.randn(1, 8, 6, 7)
    assert torch.allclose(m(x), 0.5 * torch.nn.functional.conv2d(x, m.weight) + m.bias.view(1, -1, 1, 1), atol=1e-5)


def test_deformable_fpn_fcos_makes_only_the_fpn_laterals_and_outputs_deformable():
    """Deformable-FPN-FCOS: fpn-fcos with DCNv2 (2 deformable groups) for the three 1x1
    laterals and three 3x3 output convs; P6/P7 and the head are fpn-fcos's. So its
    parameters are fpn-fcos's plus the six offset/mask convs, and every one of those
    gets a gradient (the offsets learn)."""
    dec = Decoder("deformable-fpn-fcos", in_channels=IN_CHANNELS, num_classes=3, width=64)
    plain = Decoder("fpn-fcos", in_channels=IN_CHANNELS, num_classes=3, width=64)
    assert [(m.kernel, tuple(m.weight.shape), m.offset_mask.out_channels) for m in dec.fpn.lateral] == [(1, (64, c, 1, 1), 6) for c in IN_CHANNELS[1:]]
    assert [(m.kernel, tuple(m.weight.shape), m.offset_mask.out_channels) for m in dec.fpn.output] == [(3, (64, 64, 3, 3), 54)] * 3
    deform = [m for m in dec.modules() if isinstance(m, ModulatedDeformConv)]
    assert len(deform) == 6 and not any(isinstance(m, ModulatedDeformConv) for m in [*dec.fpn.extra.modules(), *dec.head.modules()])
    offsets = sum(c * 6 + 6 for c in IN_CHANNELS[1:]) + 3 * (64 * 54 * 9 + 54)
    assert _count(dec) == _count(plain) + offsets
    outs = dec(_feats())
    _assert_outputs(outs, 2, 3, 64)
    sum(o.float().mean() for lvl in outs for o in lvl).backward()
    assert all(m.offset_mask.weight.grad is not None and m.offset_mask.weight.grad.abs().sum() > 0 for m in deform)


def test_aggregations_upsample_the_smaller_input():
    x, y = torch.randn(1, 32, 4, 4), torch.randn(1, 32, 8, 8)
    out = ParamSum(32, "bn")(x, y)
    assert out.shape == (1, 32, 8, 8)
    up = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(out, up + y)  # a = b = 1 at init
    cat = ConcatReduce(32, "bn")
    assert cat(y, x).shape == (1, 32, 8, 8)
    assert sum(p.numel() for p in cat.reduce[2].parameters()) == 2 * 32  # grouped 1x1: 2 inputs per output channel


def _assert_outputs(outs, n, num_classes, size):
    assert len(outs) == 5
    for (cls, reg, ctr), s in zip(outs, (8, 16, 32, 64, 128), strict=True):
        hw = max(1, -(-size // s))
        assert cls.shape == (n, num_classes, hw, hw) and reg.shape == (n, 4, hw, hw) and ctr.shape == (n, 1, hw, hw)


@pytest.mark.parametrize("seed", range(12))
def test_random_archs_build_forward_backward_at_64(seed):
    arch = Arch.random(np.random.default_rng(seed))
    dec = Decoder(arch, in_channels=IN_CHANNELS, num_classes=3, width=64)
    feats = _feats()
    outs = dec(feats)
    _assert_outputs(outs, 2, 3, 64)
    sum(o.float().mean() for lvl in outs for o in lvl).backward()
    grads = [p.grad for p in dec.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(o).all() for lvl in outs for o in lvl)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build(preset):
    dec = Decoder(preset, in_channels=IN_CHANNELS, num_classes=3, width=64, head_width=128)
    _assert_outputs(dec(_feats(1)), 1, 3, 64)


def test_sharing_index_changes_parameter_count_as_expected():
    arch = Arch.random(np.random.default_rng(5))
    layer_params = [_count(m) for m in _layer_modules(arch.head, 64)]
    shared_all = Arch(fpn=arch.fpn, head=arch.head, share=0)
    base = _count(Decoder(shared_all, in_channels=IN_CHANNELS, num_classes=3, width=64))
    for k in range(arch.head.num_layers + 1):
        a = Arch(fpn=arch.fpn, head=arch.head, share=k)
        n = _count(Decoder(a, in_channels=IN_CHANNELS, num_classes=3, width=64))
        # layers before k get 5 copies instead of 1, in both the cls and the reg tower
        assert n == base + 2 * 4 * sum(layer_params[:k]), k


def test_per_level_layers_are_used_per_level():
    head = Head("seq", (1, 1))
    tower = Tower(head, share=1, width=32)
    x = torch.randn(1, 32, 5, 5)
    with torch.no_grad():
        tower.layers[0][2][0].weight.zero_()  # level 2's own first conv
    assert not torch.allclose(tower(x, 0), tower(x, 2))
    assert torch.allclose(tower(x, 2), tower.layers[1](torch.relu(tower.layers[0][2][1](torch.zeros(1, 32, 5, 5)))))


def test_nas_fcos_reads_no_c2():
    dec = Decoder("nas-fcos", in_channels=IN_CHANNELS, num_classes=3, width=64)
    feats = _feats(1)
    feats[0] = torch.full_like(feats[0], float("nan"))  # C2 is not read by the found FPN
    outs = dec(feats)
    assert all(torch.isfinite(o).all() for lvl in outs for o in lvl)


def test_nas_fcos_parameter_count_at_256_for_resnet50():
    """The ``nas-fcos`` decoder (searched FPN + searched head) at width 256, 80 classes, on
    ResNet-50's C2..C5 (256, 512, 1024, 2048): 15,125,685 parameters, all trainable.

    C = 256; a deformable 3x3 op = DCN weight 9C^2 + bias C + offset/mask conv (9C*54 + 54)
    + norm 2C = 715,062; a 1x1 adapter = Cin*C + BN 2C; a cat = BN 4C + grouped 1x1 2C.
    fpn   10,756,744 = adapters 3840*256 + 4*512 (985,088)
                     + 12 deformable ops + 7 cats (12*715,062 + 7*1,536 = 8,591,496)
                     + P6/P7 2*(9C^2 + C) (1,180,160)
    head   4,368,941 = 2 towers * (2 deformable + conv3x3 9C^2 + 2C + conv1x1 C^2 + 2C)
                       (2*2,086,508) + cls 9*C*80 + 80 + box 9*C*4 + 4 + ctr 9*C + 1
    ``benchmarks/table2.py``'s "decoder params" (nasfcos.model.complexity: detector minus
    backbone) adds the 5 FCOS regression scales: 15,125,690, printed as 15.13 M.
    """
    from nasfcos.model.complexity import complexity, count_params
    from nasfcos.model.decoder import build_decoder

    with torch.device("meta"):  # shapes only: no memory, no init
        dec = build_decoder("nas-fcos", in_channels=(256, 512, 1024, 2048), num_classes=80, width=256)
    assert count_params(dec.fpn) == 10_756_744
    assert count_params(dec.head) == 4_368_941
    assert count_params(dec) == count_params(dec, trainable_only=True) == 15_125_685
    c = complexity("nas-fcos", backbone="resnet50", width=256, num_classes=80, input_size=(64, 64))
    assert c["decoder_params"] == 15_125_685 + 5
