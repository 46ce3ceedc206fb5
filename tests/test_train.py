"""Training: schedule, deterministic data order, exact resume, checkpoints."""

import pytest
import torch

from nasfcos.data import COCODetection, build_transforms
from nasfcos.engine.checkpoint import load_checkpoint
from nasfcos.engine.curves import add_scalars
from nasfcos.engine.sampling import PositionSampler
from nasfcos.engine.train import SCHEDULES, TrainConfig, lr_factor, train
from nasfcos.model.detector import DetectorSpec
from storage.curves import read_curves

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
    add_scalars(tmp_path / "b", 5, {"loss/total": 99.0})  # as if the killed attempt had logged past its checkpoint
    resumed = train(SPEC, ds, cfg, tmp_path / "b")
    assert resumed.iteration == 6
    # the curves (TensorBoard files): one value per iteration, the resumed run's after its checkpoint
    ca, cb = read_curves(tmp_path / "a"), read_curves(tmp_path / "b")
    assert {"loss/total", "loss/cls", "loss/reg", "loss/ctr", "lr", "images_per_s"} <= ca.keys() == cb.keys()
    steps, values = zip(*cb["loss/total"], strict=True)
    assert steps == (1, 2, 3, 4, 5, 6) and values == pytest.approx([v for _, v in ca["loss/total"]])
    assert [v for _, v in cb["lr"]] == pytest.approx([v for _, v in ca["lr"]]) and ca["lr"][0][1] < ca["lr"][2][1]  # warm-up
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


def test_each_update_uses_and_logs_the_reference_lr(synthetic_small, tmp_path, monkeypatch, caplog):
    # maskrcnn-benchmark (the NAS-FCOS code, PyTorch 1.0): WarmupMultiStepLR starts at last_epoch -1
    # and do_train calls scheduler.step() first in each iteration, so update k (0-based) runs at
    # last_epoch k:  lr(k) = base * warm(k) * 0.1 ** bisect_right(steps, k),
    # warm(k) = 1/3 * (1 - k/warmup) + k/warmup for k < warmup ("linear"), else 1.
    # iters 10, warmup 4, steps (6, 8), base 0.01:
    #   k=0: 1/3                       -> 0.01/3
    #   k=1: 1/3 * 3/4 + 1/4 = 1/2     -> 0.005
    #   k=2: 1/3 * 1/2 + 1/2 = 2/3     -> 0.02/3
    #   k=3: 1/3 * 1/4 + 3/4 = 5/6     -> 0.025/3
    #   k=4,5: 1                       -> 0.01
    #   k=6,7: 0.1 (first decay: update index 6, i.e. the 7th update) -> 0.001
    #   k=8,9: 0.01                    -> 0.0001
    expected = [0.01 / 3, 0.005, 0.02 / 3, 0.025 / 3, 0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001]
    used: list[list[float]] = []
    real_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        used.append([g["lr"] for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    caplog.set_level("INFO", logger="nasfcos.engine.train")
    cfg = TrainConfig(iterations=10, batch_size=2, warmup_iters=4, steps=(6, 8), checkpoint_every=10, log_every=1, num_workers=0)
    ds = _dataset(synthetic_small)
    train(SPEC, ds, cfg, tmp_path / "a")
    assert [w for w, _ in used] == pytest.approx(expected, rel=1e-9)
    assert [b for _, b in used] == pytest.approx([2 * e for e in expected], rel=1e-9)  # bias lr x2
    # the log line of update i (1-based) reports the lr that update used
    logged = [float(r.getMessage().split(" lr ")[1].split()[0]) for r in caplog.records if r.getMessage().startswith("iter ")]
    assert logged == pytest.approx(expected, abs=5e-6)
    # a killed and resumed run uses the same lr at every update
    used.clear()
    train(SPEC, ds, cfg, tmp_path / "b", stop_at=5)
    train(SPEC, ds, cfg, tmp_path / "b")
    assert [w for w, _ in used] == pytest.approx(expected, rel=1e-9)


def test_resume_with_amp_from_a_run_without_it_and_back(synthetic_small, tmp_path, monkeypatch):
    """A CPU-started run (GradScaler disabled: state {}) resumed on CUDA (scaler enabled), and the
    reverse. CPU-only: an enabled CPU GradScaler stands in for the CUDA one."""
    cfg = TrainConfig(iterations=4, batch_size=2, warmup_iters=1, steps=(), checkpoint_every=2, num_workers=0)
    ds = _dataset(synthetic_small)
    real = torch.amp.GradScaler
    train(SPEC, ds, cfg, tmp_path / "cpu-first", stop_at=2)
    assert load_checkpoint(tmp_path / "cpu-first" / "checkpoint.pt")["scaler"] == {}
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real("cpu", enabled=True))
    resumed = train(SPEC, ds, cfg, tmp_path / "cpu-first")  # keeps its fresh loss scale
    assert resumed.iteration == 4 and load_checkpoint(resumed.checkpoint)["scaler"]["scale"] > 0
    train(SPEC, ds, cfg, tmp_path / "amp-first", stop_at=2)
    assert load_checkpoint(tmp_path / "amp-first" / "checkpoint.pt")["scaler"]
    monkeypatch.setattr(torch.amp, "GradScaler", real)
    resumed = train(SPEC, ds, cfg, tmp_path / "amp-first")  # the saved scale is not needed
    assert resumed.iteration == 4 and load_checkpoint(resumed.checkpoint)["scaler"] == {}


def _named_groups(model, cfg):
    """param_groups(model, cfg) with parameter names in place of the tensors."""
    from nasfcos.engine.train import param_groups

    names = {id(p): n for n, p in model.named_parameters()}
    return [{**g, "params": [names[id(p)] for p in g["params"]]} for g in param_groups(model, cfg)]


def test_param_groups_double_bias_lr_no_bias_decay_frozen_left_out():
    from nasfcos.model.detector import build_detector

    # MobileNetV2 with freeze_at=2: the stem and res2 (features 0-3) are frozen, as in FCOS.
    model = build_detector(DetectorSpec(num_classes=3, backbone="mobilenet_v2", width=32))
    model.decoder.head.cls_logits.bias.requires_grad_(False)  # a frozen bias is left out too
    weights, biases = _named_groups(model, TrainConfig())
    # FCOS reference (maskrcnn-benchmark make_optimizer): lr 0.01, weight decay 1e-4;
    # biases lr x BIAS_LR_FACTOR 2 = 0.02 and WEIGHT_DECAY_BIAS 0.
    assert (weights["lr"], weights["weight_decay"]) == (0.01, 1e-4)
    assert (biases["lr"], biases["weight_decay"]) == (0.02, 0.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("backbone.") for n in frozen) and "decoder.head.cls_logits.bias" in frozen
    # every trainable `.bias` (conv and norm alike) is in the bias group, everything else
    # trainable (conv and norm weights, the FCOS scales) in the decayed group, each once
    assert biases["params"] == [n for n in trainable if n.endswith(".bias")]
    assert weights["params"] == [n for n in trainable if not n.endswith(".bias")]
    assert "fcos.scales" in weights["params"] and "decoder.head.cls_tower.layers.0.1.weight" in weights["params"]
    assert "decoder.head.cls_tower.layers.0.1.bias" in biases["params"]  # a GroupNorm bias


def test_train_builds_sgd_with_momentum_and_the_param_groups(synthetic_small, tmp_path):
    from nasfcos.engine.train import param_groups
    from nasfcos.model.detector import build_detector

    spec = DetectorSpec(num_classes=3, backbone="mobilenet_v2", width=32)
    cfg = TrainConfig(iterations=1, batch_size=2, checkpoint_every=1, num_workers=0)  # optimiser fields at their defaults
    result = train(spec, _dataset(synthetic_small), cfg, tmp_path)
    groups = load_checkpoint(result.checkpoint)["optimizer"]["param_groups"]
    model = build_detector(spec)
    expected = param_groups(model, cfg)
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in expected]
    assert sum(len(g["params"]) for g in groups) < len(list(model.parameters()))  # frozen ones are not optimised
    assert [(g["initial_lr"], g["weight_decay"], g["momentum"]) for g in groups] == [(0.01, 1e-4, 0.9), (0.02, 0.0, 0.9)]
    assert all(g["dampening"] == 0 and not g["nesterov"] for g in groups)  # plain SGD momentum


def test_weights_sha256_is_of_the_weights_not_the_files_bytes(tmp_path):
    """The same weights pickled with other object sharing (as a resumed training writes them)
    have other bytes but one weights hash; one changed value changes it."""
    from nasfcos.engine.checkpoint import save_checkpoint, weights_sha256

    model = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    name = "backbone.layer1"
    save_checkpoint({"model": model, "spec": {}, "groups": [name, name]}, tmp_path / "a.pt")  # one str object, pickled once
    save_checkpoint({"model": {k: v.clone() for k, v in model.items()}, "spec": {}, "groups": [name, ".".join(name.split("."))]}, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() != (tmp_path / "b.pt").read_bytes()
    assert weights_sha256(tmp_path / "a.pt") == weights_sha256(tmp_path / "b.pt")
    model["b"][1] = 1e-7
    save_checkpoint({"model": model, "spec": {}}, tmp_path / "c.pt")
    assert weights_sha256(tmp_path / "c.pt") != weights_sha256(tmp_path / "a.pt")
