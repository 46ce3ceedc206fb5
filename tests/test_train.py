"""Training: schedule, deterministic data order, exact resume, checkpoints."""

import pytest
import torch

from nasfcos.data import COCODetection, build_transforms
from nasfcos.detector import DetectorSpec
from nasfcos.train import SCHEDULES, PositionSampler, TrainConfig, load_checkpoint, lr_factor, train

SPEC = DetectorSpec(num_classes=3, backbone="tiny", width=32)


def test_paper_schedules():
    coco, voc = SCHEDULES["coco-1x"], SCHEDULES["voc-finetune"]
    assert (coco.batch_size, coco.iterations, coco.base_lr, coco.steps) == (16, 90_000, 0.01, (60_000, 80_000))
    assert (coco.min_size, coco.max_size) == ((800,), 1333)
    assert (voc.batch_size, voc.iterations, voc.base_lr, voc.steps, voc.crop) == (24, 30_000, 0.01, (18_000, 24_000), 800)


def test_lr_factor_warmup_and_steps():
    cfg = TrainConfig(warmup_iters=100, warmup_factor=1 / 3, steps=(1000, 2000))
    assert lr_factor(0, cfg) == pytest.approx(1 / 3)
    assert lr_factor(50, cfg) == pytest.approx(1 / 3 * 0.5 + 0.5)  # halfway: (1/3)(1-a) + a
    assert lr_factor(100, cfg) == pytest.approx(1.0)
    assert lr_factor(999, cfg) == pytest.approx(1.0)
    assert lr_factor(1000, cfg) == pytest.approx(0.1)
    assert lr_factor(2500, cfg) == pytest.approx(0.01)


def test_train_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"lr": 0.1})
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=(20, 10))


def test_position_sampler_resumes_with_the_same_batches():
    full = list(PositionSampler(10, batch_size=4, start=0, end=7, seed=3))
    tail = list(PositionSampler(10, batch_size=4, start=4, end=7, seed=3))
    assert full[4:] == tail
    # every epoch is a permutation of the dataset
    flat = [i for batch in full for i, _ in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]
    # augmentation seeds are unique per sample position
    seeds = [s for batch in full for _, s in batch]
    assert len(set(seeds)) == len(seeds)


def _dataset(paths):
    tf = build_transforms(train=True, min_size=64, max_size=96)  # includes random flips
    return COCODetection(paths["train_json"], paths["image_root"], transforms=tf)


def test_killed_run_resumes_exactly(synthetic_small, tmp_path):
    cfg = TrainConfig(iterations=6, batch_size=4, base_lr=0.01, warmup_iters=2, steps=(4,), checkpoint_every=3, num_workers=0, log_every=1)
    ds = _dataset(synthetic_small)
    straight = train(SPEC, ds, cfg, tmp_path / "a")
    killed = train(SPEC, ds, cfg, tmp_path / "b", stop_at=3)
    assert killed.iteration == 3 and load_checkpoint(killed.checkpoint)["iteration"] == 3
    resumed = train(SPEC, ds, cfg, tmp_path / "b")
    assert resumed.iteration == 6
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["iteration"] == b["iteration"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    # and training did change the weights
    fresh = train(SPEC, ds, TrainConfig(**{**cfg.__dict__, "iterations": 1}), tmp_path / "c")
    w = load_checkpoint(fresh.checkpoint)["model"]
    assert any(not torch.equal(w[k], a["model"][k]) for k in w)


def test_resume_refuses_a_different_model(synthetic_small, tmp_path):
    cfg = TrainConfig(iterations=1, batch_size=2, checkpoint_every=1, num_workers=0)
    ds = _dataset(synthetic_small)
    train(SPEC, ds, cfg, tmp_path)
    with pytest.raises(ValueError, match="checkpoint is for"):
        train(DetectorSpec(num_classes=3, backbone="tiny", width=64), ds, cfg, tmp_path)


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: cannot read checkpoint"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="other.pt: not a nasfcos checkpoint"):
        load_checkpoint(other)
