"""Tests for nasfcos.model.backbones: pyramid shapes, FCOS freezing, and weight loading.

All models are randomly initialised (weights=None); nothing is downloaded: tests of
torchvision weight names use a tmp TORCH_HOME holding fabricated state dicts, and a
download function that raises as if offline.
Shape legend: N images, C channels, H/W input size, Ck feature map at stride 2**k.
"""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from nasfcos.model.backbones import BACKBONE_NAMES, Backbone, build_backbone
from nasfcos.model.weights import torch_cache_path, weight_name

RESNETS = ("resnet50", "resnet101", "resnext101_32x4d")
EXPECTED_CHANNELS = {
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "resnext101_32x4d": (256, 512, 1024, 2048),
    "resnext101_32x8d": (256, 512, 1024, 2048),
    "mobilenet_v2": (24, 32, 96, 320),
    "tiny": (16, 32, 64, 128),
}


@functools.cache
def _default_backbone(name: str) -> Backbone:
    """Built once per name with defaults; tests only read from it."""
    torch.manual_seed(0)
    return build_backbone(name).eval()


@torch.no_grad()
def _randomise_bn(model: nn.Module, seed: int) -> None:
    """Give BN layers non-trivial stats so a loader that drops them would be caught."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = module.running_mean.numel()
            module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            module.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=gen))
            module.bias.copy_(0.1 * torch.randn(n, generator=gen))


def _images(n: int = 1, h: int = 64, w: int = 64, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _assert_one_line_naming(message: str, path: Path) -> None:
    assert str(path) in message
    assert "\n" not in message


@pytest.fixture(scope="module")
def tv_resnet50_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """Random torchvision resnet50 (fc, BatchNorm2d, random BN stats) and its state dict file."""
    torch.manual_seed(1)
    model = torchvision.models.resnet50(weights=None)
    _randomise_bn(model, seed=1)
    model.eval()
    path = tmp_path_factory.mktemp("weights") / "tv_resnet50.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def tv_mobilenet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(2)
    model = torchvision.models.mobilenet_v2(weights=None)
    _randomise_bn(model, seed=2)
    model.eval()
    path = tmp_path_factory.mktemp("weights") / "tv_mobilenet_v2.pth"
    torch.save(model.state_dict(), path)
    return model, path


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_pyramid_channels_and_strides(name: str) -> None:
    backbone = _default_backbone(name)
    assert backbone.out_channels == EXPECTED_CHANNELS[name]
    assert backbone.strides == (4, 8, 16, 32)
    h, w = 96, 128
    with torch.no_grad():
        feats = backbone(_images(h=h, w=w))
    assert len(feats) == 4
    for feat, channels, stride in zip(feats, backbone.out_channels, backbone.strides, strict=True):
        assert tuple(feat.shape) == (1, channels, h // stride, w // stride)


def test_all_names_covered() -> None:
    assert set(BACKBONE_NAMES) == set(EXPECTED_CHANNELS)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        build_backbone("resnet18")
    message = str(info.value)
    assert "resnet18" in message
    for name in BACKBONE_NAMES:
        assert name in message


def test_bad_norm_and_freeze_at_are_rejected() -> None:
    with pytest.raises(ValueError, match="norm"):
        build_backbone("mobilenet_v2", norm="gn_typo")
    for freeze_at in (-1, 6):
        with pytest.raises(ValueError, match="freeze_at"):
            build_backbone("mobilenet_v2", freeze_at=freeze_at)


def test_bad_input_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        _default_backbone("tiny")(torch.zeros(3, 64, 64))


# --------------------------------------------------------------------------- freezing


def _frozen_parameter_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_freezes_exactly_stem_and_layer1(name: str) -> None:
    backbone = _default_backbone(name)
    names = [n for n, _ in backbone.named_parameters()]
    expected = {n for n in names if n.startswith(("conv1.", "bn1.", "layer1."))}
    assert "conv1.weight" in expected and "layer1.0.conv1.weight" in expected
    assert _frozen_parameter_names(backbone) == expected
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert isinstance(backbone.layer4[0].bn1, FrozenBatchNorm2d)
    assert not hasattr(backbone, "fc") and not hasattr(backbone, "avgpool")


def test_resnext101_32x4d_is_grouped() -> None:
    conv2 = _default_backbone("resnext101_32x4d").layer1[0].conv2
    # width = 64 * (4 / 64) * 32 = 128 channels in 32 groups of 4.
    assert conv2.groups == 32
    assert tuple(conv2.weight.shape) == (128, 4, 3, 3)
    assert len(_default_backbone("resnext101_32x4d").layer3) == 23


def test_freeze_at_levels_with_trainable_bn() -> None:
    torch.manual_seed(0)
    none_frozen = build_backbone("resnet50", freeze_at=0, norm="bn")
    assert _frozen_parameter_names(none_frozen) == set()
    assert isinstance(none_frozen.bn1, nn.BatchNorm2d)

    stem_only = build_backbone("resnet50", freeze_at=1, norm="bn")
    # bn1 becomes FrozenBatchNorm2d, so its affine terms are buffers, not parameters.
    assert _frozen_parameter_names(stem_only) == {"conv1.weight"}
    assert isinstance(stem_only.bn1, FrozenBatchNorm2d)
    assert isinstance(stem_only.layer1[0].bn1, nn.BatchNorm2d)
    assert stem_only.layer1[0].bn1.weight.requires_grad


def test_mobilenet_freezes_first_two_stages() -> None:
    backbone = _default_backbone("mobilenet_v2")
    names = [n for n, _ in backbone.named_parameters()]
    # features[0:2] is the stride-2 stem, features[2:4] ends at C2 (stride 4).
    expected = {n for n in names if int(n.split(".")[1]) < 4}
    assert expected and len(expected) < len(names)
    assert _frozen_parameter_names(backbone) == expected
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert len(backbone.features) == 18  # the 1x1 conv to 1280 channels is dropped


def test_tiny_trains_every_layer() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("tiny")  # default freeze_at=2 does not apply to tiny
    n_params = sum(p.numel() for p in backbone.parameters())
    assert 200_000 <= n_params <= 500_000
    assert _frozen_parameter_names(backbone) == set()
    backbone.train()
    feats = backbone(_images(n=2, h=128, w=128))
    sum(f.square().mean() for f in feats).backward()
    for name, param in backbone.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    # GroupNorm: train and eval mode give the same features (no batch statistics).
    with torch.no_grad():
        train_out = backbone(_images(n=2, h=64, w=64, seed=3))
        eval_out = backbone.eval()(_images(n=2, h=64, w=64, seed=3))
    for a, b in zip(train_out, eval_out, strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- weights


def _resnet_trunk(model: nn.Module, x: Tensor) -> list[Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    c2 = model.layer1(x)
    c3 = model.layer2(c2)
    c4 = model.layer3(c3)
    return [c2, c3, c4, model.layer4(c4)]


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_torchvision_resnet50_state_dict_reproduces_trunk(tv_resnet50_file: tuple[nn.Module, Path], norm: str) -> None:
    reference, path = tv_resnet50_file
    torch.manual_seed(5)
    backbone = build_backbone("resnet50", weights=path, norm=norm).eval()
    x = _images(h=64, w=64)
    with torch.no_grad():
        expected = _resnet_trunk(reference, x)
        got = backbone(x)
        untouched = _default_backbone("resnet50")(x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(untouched[3], expected[3], rtol=1e-2, atol=1e-2)
    # Freezing happens after loading: stem+layer1 stay frozen, loaded stats kept.
    assert "layer1.0.conv1.weight" in _frozen_parameter_names(backbone)
    torch.testing.assert_close(backbone.bn1.running_var, reference.bn1.running_var)


def test_torchvision_mobilenet_state_dict_reproduces_features(
    tv_mobilenet_file: tuple[nn.Module, Path],
) -> None:
    reference, path = tv_mobilenet_file  # includes classifier.* and features.18.*
    backbone = build_backbone("mobilenet_v2", weights=path).eval()
    x = _images(h=64, w=64)
    with torch.no_grad():
        got = backbone(x)
        expected = [reference.features[:end](x) for end in (4, 7, 14, 18)]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "mobilenet_v2"])
def test_own_detector_checkpoint_loads(name: str, tmp_path: Path) -> None:
    torch.manual_seed(10)
    source = build_backbone(name, freeze_at=0).eval()
    _randomise_bn(source, seed=10)
    model_state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    model_state["head.cls_logits.weight"] = torch.randn(3, 8, 3, 3)
    path = tmp_path / "detector.pth"
    torch.save({"model": model_state, "epoch": 3, "arch": "some-arch-string"}, path)

    torch.manual_seed(11)
    loaded = build_backbone(name, weights=path).eval()
    x = _images(h=64, w=64)
    with torch.no_grad():
        for a, b in zip(loaded(x), source(x), strict=True):
            torch.testing.assert_close(a, b)


def test_plain_backbone_state_dict_loads(tmp_path: Path) -> None:
    torch.manual_seed(20)
    source = build_backbone("tiny").eval()
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(21)
    loaded = build_backbone("tiny", weights=path).eval()
    for (key, a), b in zip(loaded.state_dict().items(), source.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=key)


def test_resnet50_file_into_resnet101_names_missing_keys(
    tv_resnet50_file: tuple[nn.Module, Path],
) -> None:
    _, path = tv_resnet50_file
    with pytest.raises(ValueError) as info:
        build_backbone("resnet101", weights=path)
    message = str(info.value)
    _assert_one_line_naming(message, path)
    # resnet50 has layer3.0..5; resnet101 has layer3.0..22.
    assert "missing keys (layer3.6." in message
    assert "unexpected" not in message
    assert "resnet101" in message


def test_mobilenet_file_into_resnet50_is_rejected(
    tv_mobilenet_file: tuple[nn.Module, Path],
) -> None:
    _, path = tv_mobilenet_file
    with pytest.raises(ValueError) as info:
        build_backbone("resnet50", weights=path)
    message = str(info.value)
    _assert_one_line_naming(message, path)
    assert "missing keys (conv1.weight" in message
    assert "unexpected keys (features.0.0.weight" in message


def test_shape_mismatch_is_rejected(tv_mobilenet_file: tuple[nn.Module, Path], tmp_path: Path) -> None:
    reference, _ = tv_mobilenet_file
    state = dict(reference.state_dict())
    state["features.0.0.weight"] = torch.zeros(32, 3, 5, 5)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        build_backbone("mobilenet_v2", weights=path)
    message = str(info.value)
    _assert_one_line_naming(message, path)
    expected = "1 shape mismatch (features.0.0.weight: file (32, 3, 5, 5) vs model (32, 3, 3, 3))"
    assert expected in message


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "r50.pth"
    with pytest.raises(FileNotFoundError) as info:
        build_backbone("tiny", weights=path)
    _assert_one_line_naming(str(info.value), path)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "list", "non_tensor"])
def test_unreadable_file_names_path(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.pth"
    if kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\x00\x01\x02" * 10)
    elif kind == "truncated":
        torch.save(_default_backbone("tiny").state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "list":
        torch.save([torch.zeros(1)], path)
    else:
        torch.save({"layer1.0.0.weight": 3}, path)
    with pytest.raises(ValueError) as info:
        build_backbone("tiny", weights=path)
    _assert_one_line_naming(str(info.value), path)


# --------------------------------------------------------------------------- torchvision weight names

FCOS_COCO = "FCOS_ResNet50_FPN_Weights.COCO_V1"
R50_IMAGENET = "ResNet50_Weights.IMAGENET1K_V1"


def _no_network(monkeypatch: pytest.MonkeyPatch, torch_home: Path) -> list[str]:
    """Point TORCH_HOME at ``torch_home`` and make downloads fail as without network.

    Returns the list of URLs a download was attempted for.
    """
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    attempts: list[str] = []

    def no_network(url: str, **kwargs: object) -> dict:
        attempts.append(url)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return attempts


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """An empty torch cache and no network; the URLs of attempted downloads."""
    return _no_network(monkeypatch, tmp_path / "torch_home")


@pytest.fixture(scope="module")
def cached_home(tmp_path_factory: pytest.TempPathFactory, tv_resnet50_file: tuple[nn.Module, Path]) -> tuple[Path, dict[str, dict[str, Tensor]]]:
    """A TORCH_HOME whose cache holds random stand-ins for FCOS COCO_V1 and R-50 IMAGENET1K_V1.

    The FCOS state is laid out like COCO_V1's file: backbone.body.* (the trunk),
    backbone.fpn.*, head.*; COCO_V1 uses FrozenBatchNorm2d, so its file has no
    num_batches_tracked: those of this plain-BN build are dropped. The R-50 one has
    fc.* and num_batches_tracked, as torchvision's. Returns (TORCH_HOME, name -> state).
    """
    torch.manual_seed(3)
    fcos = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None)
    _randomise_bn(fcos, seed=3)
    states = {
        FCOS_COCO: {k: v for k, v in fcos.state_dict().items() if not k.endswith("num_batches_tracked")},
        R50_IMAGENET: tv_resnet50_file[0].state_dict(),
    }
    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TORCH_HOME", str(home))
        for name, state in states.items():
            path = torch_cache_path(torchvision.models.get_weight(name).url)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)
    return home, states


def _assert_loaded(backbone: Backbone, state: dict[str, Tensor], prefix: str = "") -> None:
    """Every tensor of ``backbone`` (bar BN counters) equals ``state[prefix + key]``."""
    for key, value in backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[prefix + key]), key


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_fcos_coco_name_loads_backbone_body_from_cache(cached_home: tuple[Path, dict[str, dict[str, Tensor]]], monkeypatch: pytest.MonkeyPatch, norm: str) -> None:
    home, states = cached_home
    attempts = _no_network(monkeypatch, home)
    state = states[FCOS_COCO]
    assert any(k.startswith("backbone.fpn.") for k in state) and any(k.startswith("head.") for k in state)
    backbone = build_backbone("resnet50", weights=FCOS_COCO, norm=norm)
    _assert_loaded(backbone, state, prefix="backbone.body.")
    assert attempts == []  # cached: no download tried


def test_imagenet_name_loads_from_cache(cached_home: tuple[Path, dict[str, dict[str, Tensor]]], monkeypatch: pytest.MonkeyPatch) -> None:
    home, states = cached_home
    attempts = _no_network(monkeypatch, home)
    _assert_loaded(build_backbone("resnet50", weights=R50_IMAGENET), states[R50_IMAGENET])
    assert attempts == []


def test_uncached_name_offline_is_one_line_naming_file_and_cache_path(offline: list[str]) -> None:
    url = torchvision.models.get_weight(FCOS_COCO).url
    path = torch_cache_path(url)
    assert path.parent.parent.parent.name == "torch_home"  # TORCH_HOME moves the cache
    with pytest.raises(FileNotFoundError) as info:
        build_backbone("resnet50", weights=FCOS_COCO)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{FCOS_COCO}: not in the torch cache and cannot be downloaded (URLError")
    assert f"place {path.name} (from {url}) at {path}" in message
    assert offline == [url]  # a download was tried, because the weights were named


def test_uncached_name_online_downloads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tv_mobilenet_file: tuple[nn.Module, Path]) -> None:
    reference, _ = tv_mobilenet_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls: list[tuple[str, dict]] = []

    def fake_download(url: str, **kwargs: object) -> dict[str, Tensor]:
        calls.append((url, kwargs))
        return reference.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    name = "MobileNet_V2_Weights.IMAGENET1K_V1"
    backbone = build_backbone("mobilenet_v2", weights=name)
    torch.testing.assert_close(backbone.features[3].conv[0][0].weight, reference.features[3].conv[0][0].weight)
    url = torchvision.models.get_weight(name).url
    assert [c[0] for c in calls] == [url]
    assert calls[0][1]["check_hash"] is True
    assert calls[0][1]["model_dir"] == str(torch_cache_path(url).parent)


@pytest.mark.parametrize(
    ("backbone", "name", "fits"),
    [
        ("resnet50", "ResNet101_Weights.IMAGENET1K_V2", "ResNet50_Weights.*, FCOS_ResNet50_FPN_Weights.*"),
        ("mobilenet_v2", FCOS_COCO, "MobileNet_V2_Weights.*"),
        ("tiny", R50_IMAGENET, "none in torchvision"),
    ],
)
def test_name_for_another_backbone_names_both_before_any_download(offline: list[str], backbone: str, name: str, fits: str) -> None:
    with pytest.raises(ValueError) as info:
        build_backbone(backbone, weights=name)
    message = str(info.value)
    assert message == f"{name}: does not fit backbone {backbone!r} (weights that do: {fits})"
    assert offline == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ResNet50_Weights.IMAGENET", "ResNet50_Weights has ResNet50_Weights.IMAGENET1K_V1, "),
        ("Resnet50_Weights.IMAGENET1K_V1", "not a torchvision weight name; write a torchvision weight name as Xxx_Weights.MEMBER"),
    ],
)
def test_bad_weight_name_says_how_to_write_it(offline: list[str], name: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        build_backbone("tiny", weights=name)
    message = str(info.value)
    assert message.startswith(f"{name}: ") and expected in message
    assert "\n" not in message
    assert offline == []


def test_weight_name_tells_names_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert weight_name(FCOS_COCO) == FCOS_COCO
    assert weight_name(Path(R50_IMAGENET)) == R50_IMAGENET
    assert weight_name("weights/resnet50.pth") is None
    assert weight_name("ResNet50_Weights") is None  # no member: a file name
    monkeypatch.chdir(tmp_path)
    Path(R50_IMAGENET).write_bytes(b"")  # a file of that name wins over the name
    assert weight_name(R50_IMAGENET) is None


def test_weight_table_names_torchvision_enums() -> None:
    from nasfcos.model.weights import _TORCHVISION_WEIGHTS

    for backbone, classes in _TORCHVISION_WEIGHTS.items():
        assert backbone in BACKBONE_NAMES
        assert torchvision.models.get_model_weights(backbone).__name__ == classes[0]
        for cls in classes:
            torchvision.models.get_weight(f"{cls}.DEFAULT")
