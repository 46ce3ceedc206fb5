"""The proxy task: materialised features, decoder training with EMA, reward."""

import numpy as np
import pytest
import torch

from nasfcos.arch import Arch
from nasfcos.data import COCODetection
from nasfcos.engine.materialise import FeatureComputer, fit_split, meta_split, proxy_transforms
from nasfcos.engine.proxy import ProxyConfig, evaluate_arch, prepare_split
from nasfcos.model.backbones import build_backbone


@pytest.fixture(scope="module")
def proxy_splits(synthetic_small):
    """Meta-train 24 / meta-val 8 of the small synthetic set, 64x64 crops, tiny backbone features."""
    torch.manual_seed(0)
    ds = COCODetection(synthetic_small["train_json"], synthetic_small["image_root"], transforms=proxy_transforms(64))
    val_ds = COCODetection(synthetic_small["val_json"], synthetic_small["image_root"], transforms=proxy_transforms(64))
    backbone = build_backbone("tiny")

    def split(dataset, idx):
        out = FeatureComputer(backbone, dataset, idx, seed=0, batch_size=8)(0, len(idx))
        feats = {k: torch.from_numpy(v) for k, v in out["features"].items()}
        return prepare_split(feats, out["boxes"], out["labels"], num_classes=3)

    return split(ds, np.arange(len(ds))), split(val_ds, np.arange(len(val_ds)))


def test_meta_split_is_seeded_and_disjoint():
    tr, va = meta_split(5715, seed=0)
    assert len(tr) == 4000 and len(va) == 1715 and not set(tr) & set(va)
    assert np.array_equal(tr, meta_split(5715, seed=0)[0]) and not np.array_equal(tr, meta_split(5715, seed=1)[0])
    with pytest.raises(ValueError, match="meta-train size"):
        meta_split(10, train_size=10)


def test_fit_split_keeps_sizes_that_fit_and_scales_down_in_proportion_otherwise():
    assert fit_split(5715, 4000, 1715) == (4000, 1715) and fit_split(6000, 4000, 1715) == (4000, 1715)
    assert fit_split(5715, 4000) == (4000, 1715) and fit_split(4001, 4000) == (4000, 1)  # None: the rest
    # 23 images for 16 + 8: 23 * 16/24 = 15.3 -> 15 + 8; too few for 4000 + the rest: the paper's 70:30
    assert fit_split(23, 16, 8) == (15, 8) and fit_split(100, 4000, 1715) == fit_split(100, 4000) == (70, 30)
    assert fit_split(2, 4000, 1715) == (1, 1) and fit_split(3, 1, 5) == (1, 2)  # never an empty split
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        fit_split(1, 4000, 1715)


def test_paper_defaults():
    cfg = ProxyConfig()
    assert (cfg.width, cfg.lr, cfg.batch_size, cfg.epochs, cfg.ema_decay) == (64, 8e-4, 200, 15, 0.9)


def test_training_improves_reward_and_is_deterministic(proxy_splits):
    train, val = proxy_splits
    untrained = evaluate_arch("fpn-fcos", train, val, num_classes=3, cfg=ProxyConfig(epochs=0, batch_size=8))
    cfg = ProxyConfig(epochs=12, batch_size=8)
    trained = evaluate_arch("fpn-fcos", train, val, num_classes=3, cfg=cfg)
    again = evaluate_arch("fpn-fcos", train, val, num_classes=3, cfg=cfg)
    assert untrained["status"] == trained["status"] == "ok", (untrained["error"], trained["error"])
    # The untrained decoder's regression loss is large (random boxes); training must cut the total clearly.
    assert trained["reward"] > untrained["reward"] + 1.0, (trained, untrained)
    assert trained["reward"] == pytest.approx(-(trained["loss_cls"] + trained["loss_reg"] + trained["loss_ctr"]))
    assert again["reward"] == trained["reward"]  # same seed, same reward, bit for bit on CPU
    assert trained["params"] > 0 and trained["train_seconds"] > 0 and trained["device"] == "cpu"


def test_streamed_features_give_the_same_reward(proxy_splits):
    """Host-streamed batches (features that do not fit the device) are the resident
    batches in the same order: the record is identical, bit for bit on CPU."""
    train, val = proxy_splits
    streamed = [type(s)(feats=s.feats, assigned=s.assigned, points=s.points, size_ranges=s.size_ranges, stream=True) for s in (train, val)]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    got = list(streamed[0].batches(order, 5))
    want = list(train.batches(order, 5))
    assert len(got) == len(want) == 5 and all(torch.equal(a, b) for (_, fa), (_, fb) in zip(got, want, strict=True) for a, b in zip(fa, fb, strict=True))
    cfg = ProxyConfig(epochs=2, batch_size=7)  # 24 samples: a short last batch
    a = evaluate_arch("fpn-fcos", train, val, num_classes=3, cfg=cfg)
    b = evaluate_arch("fpn-fcos", *streamed, num_classes=3, cfg=cfg)
    assert a["status"] == b["status"] == "ok" and (a["reward"], a["loss_reg"], a["macs"]) == (b["reward"], b["loss_reg"], b["macs"])


def test_a_random_arch_trains(proxy_splits):
    train, val = proxy_splits
    arch = Arch.random(np.random.default_rng(3))
    rec = evaluate_arch(arch, train, val, num_classes=3, cfg=ProxyConfig(epochs=1, batch_size=12))
    assert rec["status"] == "ok", rec["error"]
    assert rec["arch_id"] == arch.arch_id and rec["arch"] == str(arch) and np.isfinite(rec["reward"])


def test_nan_loss_is_a_failed_record_not_an_exception(proxy_splits):
    train, val = proxy_splits
    poisoned = type(train)(feats=[f.clone() for f in train.feats], assigned=train.assigned, points=train.points)
    poisoned.feats[3][0, 0, 0, 0] = float("nan")  # one NaN in C5 spreads through training
    rec = evaluate_arch("fpn-fcos", poisoned, val, num_classes=3, cfg=ProxyConfig(epochs=1, batch_size=8))
    assert rec["status"] == "failed"
    assert "non-finite" in rec["error"] and np.isnan(rec["reward"])


def test_prepare_split_rejects_missing_levels():
    with pytest.raises(ValueError, match="C2"):
        prepare_split({"C3": torch.zeros(1, 4, 8, 8)}, [np.zeros((0, 4))], [np.zeros(0)], num_classes=3)


def test_size_ranges_scaled_to_the_proxy_crop():
    """§4.1: at a 384 crop the ranges are 0-64-...-512-inf x 384/800 = 0-30.72-61.44-122.88-245.76-inf,
    so a 370 px object gives P7 positives (points near its corners have max(l,t,r,b) > 245.76)
    while FCOS's unscaled ranges (P7 from 512) give P7 nothing."""
    feats = {f"C{i + 2}": torch.zeros(1, 1, 384 // s, 384 // s) for i, s in enumerate((4, 8, 16, 32))}
    boxes, labels = [np.array([[7.0, 7.0, 377.0, 377.0]])], [np.array([0])]
    scaled = prepare_split(feats, boxes, labels, num_classes=2)
    edges = [lo for lo, _ in scaled.size_ranges] + [scaled.size_ranges[-1][1]]
    assert edges == pytest.approx([0, 30.72, 61.44, 122.88, 245.76, float("inf")])
    unscaled = prepare_split(feats, boxes, labels, num_classes=2, size_range_scale=1.0)
    assert unscaled.size_ranges[-1] == (512.0, float("inf"))

    def p7_positives(split):
        start = sum(split.points.level_sizes[:4])
        return int((split.assigned.labels[0, start:] >= 0).sum())

    assert p7_positives(scaled) > 0 and p7_positives(unscaled) == 0


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_resumed_proxy_run_equals_one_trained_at_once(proxy_splits, sync_free):
    """Successive halving's resume: 1 epoch, its state kept (packed to bytes, as storage keeps
    it), then resumed to 3 epochs gives bit for bit the reward of 3 epochs trained at once
    (weights, EMA, Adam moments and the data order all continue), with both EMA variants."""
    from nasfcos.search.halving import pack_state, unpack_state

    train, val = proxy_splits
    arch = "fpn=[2,3,0,3,0][1,4,1,0,1][3,5,2,0,0][4,2,0,3,1][6,7,0,0,1][5,3,3,0,0][0,1,1,2,0];head=seq[2,1,4,0,3,2];share=2"
    cfg = lambda epochs: ProxyConfig(epochs=epochs, batch_size=8, sync_free=sync_free)  # noqa: E731
    kept, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: a second thread only waits (10x slower on a loaded 2-core machine)
    try:
        short = evaluate_arch(arch, train, val, num_classes=3, cfg=cfg(1), keep_state=kept.append)
        resumed = evaluate_arch(arch, train, val, num_classes=3, cfg=cfg(3), resume=unpack_state(pack_state(kept[0])))
        straight = evaluate_arch(arch, train, val, num_classes=3, cfg=cfg(3))
    finally:
        torch.set_num_threads(threads)
    assert short["status"] == resumed["status"] == straight["status"] == "ok", (short["error"], resumed["error"])
    assert (short["epochs"], resumed["epochs"]) == (1, 3) and short["reward"] != straight["reward"]
    assert resumed["reward"] == straight["reward"]


def test_ap_reward_is_the_meta_val_coco_ap_and_the_losses_stay_recorded(proxy_splits):
    """§4.4.1's ablation: reward="ap" scores the decoder's detections with pycocotools; the
    same arch and seed train the same weights, so its losses equal the loss reward's."""
    from nasfcos.engine.proxy import ProxyModel, validation_ap

    train, val = proxy_splits
    cfg = dict(batch_size=8, epochs=2, eval_batch_size=8)
    by_loss = evaluate_arch("fpn-fcos", train, val, num_classes=3, cfg=ProxyConfig(**cfg))
    by_ap = evaluate_arch("fpn-fcos", train, val, num_classes=3, cfg=ProxyConfig(**cfg, reward="ap"))
    assert by_loss["status"] == by_ap["status"] == "ok"
    assert 0.0 <= by_ap["reward"] <= 1.0 and by_loss["reward"] < 0
    assert all(by_ap[f"loss_{k}"] == by_loss[f"loss_{k}"] for k in ("cls", "reg", "ctr"))
    with pytest.raises(ValueError, match="reward must be one of"):
        ProxyConfig(reward="map")
    # a model whose detections are the ground truth scores AP 1
    model = ProxyModel(Arch.parse("fpn=fcos;head=fcos;share=0"), in_channels=tuple(f.shape[1] for f in val.feats), num_classes=3, cfg=ProxyConfig())
    truth = [{"boxes": b, "scores": torch.ones(len(b)), "labels": lab} for b, lab in zip(val.boxes, val.labels, strict=True)]
    model.fcos.postprocess = lambda outs, sizes: [truth[i] for i in range(len(sizes))] if len(sizes) == len(truth) else None
    assert validation_ap(model, val, batch_size=len(val), autocast=False)["AP"] == pytest.approx(1.0)
