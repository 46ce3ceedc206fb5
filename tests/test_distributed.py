"""Data-parallel training: 2 gloo processes on CPU equal one process over the same global
batch, resume exactly, and train a searched FPN with BatchNorm."""

import pytest
import torch

from nasfcos.data import COCODetection, build_transforms
from nasfcos.engine.checkpoint import load_checkpoint
from nasfcos.engine.distributed import backend_for, rank_devices, train_on_devices
from nasfcos.engine.sampling import PositionSampler
from nasfcos.engine.train import TrainConfig, train
from nasfcos.model.detector import DetectorSpec, build_detector

SPEC = DetectorSpec(num_classes=3, backbone="tiny", width=32)  # GroupNorm only: per-image maths
# 5 updates through warm-up and a step; batch 4 = 2 images per rank
CFG = TrainConfig(iterations=5, batch_size=4, base_lr=0.01, warmup_iters=2, steps=(4,), checkpoint_every=3, log_every=1, num_workers=0)


def _dataset(paths):
    # crop 64: every image 64x64, so no rank pads differently from the one-process batch
    tf = build_transforms(train=True, min_size=64, max_size=96, crop=64)
    return COCODetection(paths["train_json"], paths["image_root"], transforms=tf)


def _assert_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=atol), (k, (a[k].float() - b[k].float()).abs().max())


def test_rank_shares_concatenate_to_the_global_batch():
    one = list(PositionSampler(10, batch_size=4, start=2, end=5, seed=1))
    ranks = [list(PositionSampler(10, batch_size=4, start=2, end=5, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == one
    with pytest.raises(ValueError, match="batch size 4 is not divisible by 3"):
        PositionSampler(10, batch_size=4, start=0, end=1, seed=1, rank=0, world_size=3)


def test_devices_and_backend():
    assert rank_devices("cpu", 2) == ["cpu", "cpu"] and backend_for(["cpu", "cpu"]) == "gloo"
    assert rank_devices("cuda", 3) == ["cuda:0", "cuda:1", "cuda:2"] and rank_devices("cuda:2", 2) == ["cuda:2", "cuda:3"]
    assert backend_for(["cuda:0", "cuda:1"]) == "nccl"
    with pytest.raises(ValueError, match="its own GPU"):
        backend_for(["cuda:0", "cuda:0"])
    with pytest.raises(ValueError, match="all cpu or all cuda"):
        backend_for(["cpu", "cuda:0"])


def test_batch_not_divisible_by_devices_is_one_line(synthetic_small, tmp_path):
    cfg = TrainConfig(**{**CFG.__dict__, "batch_size": 3})
    with pytest.raises(ValueError, match="batch size 3 is not divisible by the 2 devices"):
        train_on_devices(SPEC, _dataset(synthetic_small), cfg, tmp_path, devices=["cpu", "cpu"])


def test_two_processes_equal_one_and_resume_exactly(synthetic_small, tmp_path):
    """Same weights after 5 updates as one process over the same global batches (1e-5),
    and a 2-process run killed after iteration 3 resumes to the uninterrupted weights."""
    ds = _dataset(synthetic_small)
    one = train(SPEC, ds, CFG, tmp_path / "one")
    two = train_on_devices(SPEC, ds, CFG, tmp_path / "two", devices=["cpu", "cpu"])
    assert two.iteration == 5 and two.last_losses.keys() == {"cls", "reg", "ctr"}
    a, b = load_checkpoint(one.checkpoint), load_checkpoint(two.checkpoint)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    _assert_weights(a["model"], b["model"], atol=1e-5)
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-4)  # the logged loss is the global batch's
    # training moved the weights by far more than the tolerance
    torch.manual_seed(CFG.seed)  # the initial weights, as train() builds them
    init = build_detector(SPEC).state_dict()
    assert max((init[k].float() - a["model"][k].float()).abs().max() for k in init) > 1e-3

    killed = train_on_devices(SPEC, ds, CFG, tmp_path / "killed", devices=["cpu", "cpu"], stop_at=3)
    assert killed.iteration == 3
    resumed = train_on_devices(SPEC, ds, CFG, tmp_path / "killed", devices=["cpu", "cpu"])
    c = load_checkpoint(resumed.checkpoint)
    assert c["iteration"] == 5
    _assert_weights(b["model"], c["model"], atol=0)  # gloo sums in a fixed order: bit-exact
    for k in b["optimizer"]["state"]:
        assert torch.equal(b["optimizer"]["state"][k]["momentum_buffer"], c["optimizer"]["state"][k]["momentum_buffer"])


def test_searched_fpn_with_batchnorm_trains_on_two_processes(synthetic_small, tmp_path):
    # the released FPN with its deformable convs (op 4) swapped for sep_conv_3x3 (op 0, fast on
    # CPU): 23 trainable BatchNorm2d; it leaves the C2 adapter unused (find_unused_parameters)
    arch = "fpn=[3,3,0,0,1][3,3,0,0,1][4,3,0,3,1][1,3,0,3,1][5,3,0,0,1][4,7,0,0,1][7,2,0,0,1];head=fcos;share=0"
    spec = DetectorSpec(num_classes=3, backbone="tiny", decoder=arch, width=32)
    cfg = TrainConfig(**{**CFG.__dict__, "iterations": 2, "checkpoint_every": 2})
    result = train_on_devices(spec, _dataset(synthetic_small), cfg, tmp_path, devices=["cpu", "cpu"])
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["iteration"] == 2 and all(torch.isfinite(torch.tensor(v)) for v in ckpt["losses"].values())
    bn = [k for k in ckpt["model"] if k.startswith("decoder.fpn") and k.endswith("running_mean")]
    assert len(bn) == 23 and any(ckpt["model"][k].abs().sum() > 0 for k in bn)  # statistics moved
