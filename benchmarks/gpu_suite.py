"""GPU suite (issue #15): the proxy, training, inference and deformable convs, each beside its
torchvision peer, and the on/off ablation of every speed switch, in one run.

    python benchmarks/gpu_suite.py --out runs/gpu-bench            # full size, one GPU, <= ~8 min on an H100
    python benchmarks/gpu_suite.py --out /tmp/gs --small           # tiny shapes: seconds on CPU (the smoke test)
    python benchmarks/gpu_suite.py --out DIR --only proxy,infer    # some sections

Writes ``DIR/results.json`` (after every section, so a run cut short keeps what it measured)
and ``DIR/results.md`` (the tables). Needs only torch, torchvision, numpy and Pillow: no
prefect, zarr or pycocotools, no weights (random init) and no dataset (synthetic inputs;
the timings do not depend on the values). Runs on torch >= 2.11 / torchvision >= 0.26.

Sections (full size):

``deform``  ``torchvision.ops.deform_conv2d`` forward+backward at the proxy's shapes (batch 200,
            64 channels, P3-P5 of a 384 crop, 2 deformable groups) in fp32, fp16 and bf16 (called
            with tensors of that dtype; "unsupported" where the kernel refuses), beside a 3x3 conv.
``proxy``   the paper's proxy (§4.1): 4000/1715 samples of R-50 C2..C5 at 384x384 (fp16, on the
            device or streamed as ``execution.feature_residency: auto`` decides), @64, batch 200,
            Adam, EMA 0.9, meta-val loss; ``fpn-fcos``, ``nas-fcos`` and 5 random archs (seed 0).
            Each is trained ``--proxy-epochs`` epochs (2) and its 15-epoch time estimated as
            setup + 15 x epoch + validation. Peer: torchvision FPN + FCOSHead on the same
            features (``benchmarks/proxy.py``). Then: peak memory per evaluation, how many fit on
            the GPU beside the features and archs/hour with that many running at once (threads,
            as the thread runner's device slots); host syncs per step with and without
            ``sync_free`` (``torch.cuda.set_sync_debug_mode``); the ablation of each
            ``ProxyConfig`` switch; reward of 5 archs with deformable convs in fp32 vs half
            (rank order, |delta reward|); ``compile`` (compile seconds vs seconds saved per epoch).
``train``   images/s at 800x1333, batch 16 (halved until it fits), AMP, one GPU, synthetic
            batches: FPN-FCOS, NAS-FCOS @128, @128-256, @256 on R-50 and torchvision FCOS R-50;
            the ablation of each ``TrainConfig`` switch on FPN-FCOS and NAS-FCOS@128-256.
``infer``   latency at batch 1, 800x1088, forward + post-processing, median and p90, fp32 and
            fp16 autocast, same models (ours: ``Detector.predict``, frozen BatchNorms folded);
            post-processing loaded (the class bias raised so every
            location is a candidate: top-1000 per level, NMS on 5,000 boxes, the worst case);
            post-processing alone: ours, the per-level loop it replaced, torchvision's.
``data``    the data pipeline's images/s (JPEG decode + resize to 800/1333 + flip + normalise +
            collate) with one DataLoader worker per CPU core.
``ddp``     data-parallel training through torchrun (issue #28), CUDA only. With 2+ GPUs: a
            searched FPN with 23 trainable BatchNorms (SyncBatchNorm on CUDA) trained 2
            iterations on 2 ranks (NCCL) equals one GPU within 1e-4 (tests/test_distributed.py's
            SyncBN test), and images/s of 2 ranks vs 1. With 1 GPU: the NCCL ``env://`` path
            with one rank (torchrun ``--standalone``) equals the in-process run; SyncBN is
            recorded as not run. On CPU the section records that it needs CUDA.

The torchvision peer of the detector is ``fcos_resnet50_fpn`` as built for pretrained weights
(FrozenBatchNorm2d, 3 trainable stages: the same configuration as ours; ``--tv-peer default``:
as built without weights, trainable BatchNorm everywhere). ``--budget-s`` (420) makes
optional parts (ablations, concurrency, accuracy, compile) give way when time runs short.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # python benchmarks/gpu_suite.py from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from torchvision.ops import batched_nms

from nasfcos.arch import Arch, resolve
from nasfcos.engine.proxy import ProxyConfig, ProxyModel, evaluate_arch, prepare_split, stream_features, train_proxy
from nasfcos.engine.train import AMP_DTYPES, LossSums, TrainConfig, param_groups
from nasfcos.model.decoder import build_decoder
from nasfcos.model.detector import DetectorSpec, build_detector
from nasfcos.model.fcos import FCOS, flatten_outputs, ltrb_to_boxes
from nasfcos.model.ops import ModulatedDeformConv, set_deform_dtype

SECTIONS = ("deform", "proxy", "train", "infer", "data", "ddp")
PAPER_EPOCHS = 15

FULL = dict(
    proxy=dict(
        channels=(256, 512, 1024, 2048),
        size=384,
        n_train=4000,
        n_val=1715,
        batch=200,
        width=64,
        classes=20,
        randoms=5,
        ablation_archs=("fpn-fcos", "nas-fcos"),
        accuracy_archs=5,
        accuracy_pick="most",
    ),
    deform=dict(shapes=((200, 64, 48, 48), (200, 64, 24, 24), (200, 64, 12, 12)), warmup=2, iters=10),
    train=dict(backbone="resnet50", size=(800, 1333), batch=16, classes=80, warmup=3, iters=10, widths={128: 128, 256: 256}, half_deform=True),
    infer=dict(backbone="resnet50", size=(800, 1088), classes=80, warmup=10, iters=50),
    data=dict(images=256, image_size=(480, 640), batch=16, min_size=800, max_size=1333, passes=3),
    ddp=dict(images=16, size=128, iterations=2, throughput_backbone="resnet50", throughput_size=512, throughput_iters=12),
)
SMALL = dict(
    # widths >= 64: GroupNorm(32) needs 2 values per group on a 1x1 P7 at batch 1
    # (random0 has one deformable conv: the cheapest arch every switch applies to)
    proxy=dict(
        channels=(16, 32, 64, 128), size=64, n_train=4, n_val=2, batch=2, width=64, classes=3, randoms=1, ablation_archs=("random0",), accuracy_archs=1, accuracy_pick="fewest"
    ),
    deform=dict(shapes=((4, 32, 8, 8),), warmup=0, iters=1),
    # half_deform: torchvision's fp16 CPU deform kernel is slow; the proxy section covers the switch
    train=dict(backbone="tiny", size=(64, 96), batch=2, classes=3, warmup=0, iters=1, widths={128: 64, 256: 128}, half_deform=False),
    infer=dict(backbone="tiny", size=(64, 96), classes=3, warmup=0, iters=2),
    data=dict(images=4, image_size=(48, 64), batch=2, min_size=64, max_size=96, passes=1),
    ddp=dict(images=8, size=64, iterations=2, throughput_backbone="tiny", throughput_size=64, throughput_iters=3),
)


# ------------------------------------------------------------------------------ helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device, *, warmup: int, iters: int) -> list[float]:
    """Per-call seconds (synchronised around each call) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def p90(values: list[float]) -> float:
    return float(np.percentile(values, 90)) if values else float("nan")


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


class Budget:
    """Wall-clock budget of the run: optional parts ask whether there is time left."""

    def __init__(self, seconds: float) -> None:
        self.t0, self.total = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()


def count_deform(arch: str, width: int = 32) -> int:
    dec = build_decoder(arch, in_channels=(16, 32, 64, 128), num_classes=1, width=width)
    return sum(isinstance(m, ModulatedDeformConv) for m in dec.modules())


def archs(randoms: int) -> list[tuple[str, str]]:
    """fpn-fcos, nas-fcos and ``randoms`` random archs (seed 0, as benchmarks/proxy.py)."""
    rng = np.random.default_rng(0)
    return [("fpn-fcos", "fpn-fcos"), ("nas-fcos", "nas-fcos")] + [(f"random{i}", str(Arch.random(rng))) for i in range(randoms)]


def reference_postprocess(fcos: FCOS, outputs, image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """FCOS.postprocess as it was before issue #15: a Python loop over images and levels,
        every point decoded, timed beside the vectorised one (tests/test_speed_switches.py holds the
    copy the tests check against)."""
    points = fcos.points([o[0].shape[-2:] for o in outputs], outputs[0][0].device)
    cls, reg, ctr = flatten_outputs(outputs)
    prob = torch.sigmoid(cls.float())  # (N, P, K)
    ctr_prob = torch.sigmoid(ctr.float())  # (N, P)
    ltrb = fcos.decode(reg, points)  # (N, P, 4)
    level_starts = [0]
    for n in points.level_sizes:
        level_starts.append(level_starts[-1] + n)
    K = cls.shape[-1]
    results = []
    for i, (H, W) in enumerate(image_sizes):
        boxes_i, scores_i, labels_i = [], [], []
        for a, b in zip(level_starts[:-1], level_starts[1:], strict=True):
            p = prob[i, a:b]  # (Pl, K)
            combined = (p * ctr_prob[i, a:b, None]).flatten()  # (Pl*K,)
            cand = torch.nonzero(p.flatten() > fcos.score_thresh).squeeze(1)
            if cand.numel() > fcos.pre_nms_top_n:
                cand = cand[combined[cand].topk(fcos.pre_nms_top_n).indices]
            point_idx, label = cand // K + a, cand % K
            boxes = ltrb_to_boxes(points.xy[point_idx], ltrb[i, point_idx])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
            boxes_i.append(boxes)
            scores_i.append(combined[cand].sqrt())
            labels_i.append(label)
        boxes, scores, labels = torch.cat(boxes_i), torch.cat(scores_i), torch.cat(labels_i)
        keep = batched_nms(boxes, scores, labels, fcos.nms_thresh)[: fcos.max_detections]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return results


# ------------------------------------------------------------------------------ torchvision peer
class _TVBody(nn.Module):
    """Any of our backbones + torchvision's FPN (P3-P7), as torchvision FCOS consumes it (--small)."""

    def __init__(self, body: nn.Module, width: int) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.out_channels[1:]), width, extra_blocks=LastLevelP6P7(width, width))
        self.out_channels = width

    def forward(self, x):
        c = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(c[1:])))


def torchvision_fcos(backbone: str, num_classes: int, size: tuple[int, int], peer: str) -> nn.Module:
    """torchvision FCOS R-50 with random weights, its transform at the image's own size (no rescale)."""
    from torchvision.models.detection import FCOS as TVFCOS
    from torchvision.models.detection import fcos_resnet50_fpn

    sizes = dict(min_size=min(size), max_size=max(size))
    if backbone != "resnet50":
        from nasfcos.model.backbones import build_backbone

        return TVFCOS(_TVBody(build_backbone(backbone), 64), num_classes, **sizes)
    if peer == "default":
        return fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **sizes)
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return TVFCOS(body, num_classes, **sizes)


# ------------------------------------------------------------------------------ section: deform
def run_deform(S: dict, device: torch.device, budget: Budget) -> dict:
    from torchvision.ops import deform_conv2d

    rows = []
    for N, C, H, W in S["shapes"]:
        g = torch.Generator(device="cpu").manual_seed(0)
        base = dict(
            x=torch.randn(N, C, H, W, generator=g),
            offset=torch.randn(N, 2 * 2 * 9, H, W, generator=g) * 0.5,
            mask=torch.rand(N, 2 * 9, H, W, generator=g),
            weight=torch.randn(C, C, 3, 3, generator=g) * 0.05,
            bias=torch.zeros(C),
        )
        conv_fp32 = None
        cases = [("deform_conv2d", dt) for dt in (torch.float32, torch.float16, torch.bfloat16)]
        cases += [("conv2d 3x3", dt) for dt in (torch.float32, torch.bfloat16)]
        for op, dt in cases:
            t = {k: v.to(device, dt).requires_grad_(k != "mask") for k, v in base.items()}

            def step(op=op, t=t):
                if op == "deform_conv2d":
                    out = deform_conv2d(t["x"], t["offset"], t["weight"], t["bias"], padding=1, mask=t["mask"])
                else:
                    out = torch.nn.functional.conv2d(t["x"], t["weight"], t["bias"], padding=1)
                out.float().sum().backward()

            row = dict(shape=f"{N}x{C}x{H}x{W}", op=op, dtype=str(dt).replace("torch.", ""))
            try:
                times = seconds(step, device, warmup=S["warmup"], iters=S["iters"])
                row["ms"] = 1e3 * statistics.median(times)
            except (RuntimeError, NotImplementedError) as e:
                row["ms"], row["note"] = None, "unsupported: " + short(e)
            if op == "conv2d 3x3" and dt == torch.float32:
                conv_fp32 = row["ms"]
            rows.append(row)
        for row in rows:
            if row["shape"] == f"{N}x{C}x{H}x{W}" and row.get("ms") and conv_fp32:
                row["x conv fp32"] = row["ms"] / conv_fp32
    return {"rows": rows}


# ------------------------------------------------------------------------------ section: proxy
def fake_features(n: int, S: dict, device: torch.device, *, stream: bool, seed: int) -> tuple[dict, list, list]:
    """Random fp16 C2..C5 of ``n`` crops (made on the device, kept in host memory if ``stream``),
    1-5 random boxes each."""
    g = torch.Generator(device=device).manual_seed(seed)
    feats = {}
    for i, (c, s) in enumerate(zip(S["channels"], (4, 8, 16, 32), strict=True)):
        shape = (n, c, S["size"] // s, S["size"] // s)
        if not stream:
            feats[f"C{i + 2}"] = torch.randn(shape, generator=g, device=device, dtype=torch.float16)
        else:
            host = torch.empty(shape, dtype=torch.float16)
            for a in range(0, n, 256):
                b = min(n, a + 256)
                host[a:b] = torch.randn((b - a, *shape[1:]), generator=g, device=device, dtype=torch.float16).cpu()
            feats[f"C{i + 2}"] = host
    rng = np.random.default_rng(seed)
    boxes, labels = [], []
    size = S["size"]
    for _ in range(n):
        m = int(rng.integers(1, 6))
        xy = rng.random((m, 2)) * size * 0.8
        wh = 8 + rng.random((m, 2)) * size * 0.5
        boxes.append(np.concatenate([xy, np.minimum(xy + wh, size)], 1).astype(np.float32))
        labels.append(rng.integers(0, S["classes"], m))
    return feats, boxes, labels


def proxy_row(name: str, arch: str, rec: dict, wall: float, epochs: int, base_mb: float | None) -> dict:
    per_epoch = rec["train_seconds"] / max(epochs, 1)
    setup = max(wall - rec["train_seconds"] - rec["eval_seconds"], 0.0)
    return dict(
        arch=name, arch_string=arch, status=rec["status"], error=rec["error"], reward=rec["reward"],
        epochs=epochs, wall_s=wall, train_s=rec["train_seconds"], eval_s=rec["eval_seconds"], setup_s=setup,
        epoch_s=per_epoch, est_paper_s=setup + PAPER_EPOCHS * per_epoch + rec["eval_seconds"],
        peak_mb=None if base_mb is None else rec["peak_mem_mb"] - base_mb, macs=rec["macs"], params=rec["params"],
    )  # fmt: skip


def run_proxy(S: dict, device: torch.device, budget: Budget, args, out: dict, save) -> dict:
    P = S["proxy"]
    E = args.proxy_epochs
    res: dict = {"setting": {**{k: v for k, v in P.items()}, "measured_epochs": E, "paper_epochs": PAPER_EPOCHS}}
    out["proxy"] = res
    nbytes = sum((P["n_train"] + P["n_val"]) * c * (P["size"] // s) ** 2 * 2 for c, s in zip(P["channels"], (4, 8, 16, 32), strict=True))
    stream = stream_features(nbytes, device, "auto")
    res["setting"].update(feature_gb=nbytes / 1e9, streamed=stream)
    t = time.perf_counter()
    raw_train = fake_features(P["n_train"], P, device, stream=stream, seed=0)
    train = prepare_split(*raw_train, num_classes=P["classes"], device=device, stream=stream)
    val = prepare_split(*fake_features(P["n_val"], P, device, stream=stream, seed=1), num_classes=P["classes"], device=device, stream=stream)
    sync(device)
    res["setting"]["prepare_s"] = time.perf_counter() - t
    base_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    res["setting"]["resident_mb"] = base_mb
    K = P["classes"]

    def cfg(**kw) -> ProxyConfig:
        return ProxyConfig(width=P["width"], batch_size=P["batch"], eval_batch_size=P["batch"], epochs=kw.pop("epochs", E), **kw)

    def evaluate(name: str, arch: str, c: ProxyConfig, shared: bool = False) -> dict:
        """A table row; infrastructure errors (which evaluate_arch raises) become rows too."""
        peak_reset(device)
        t = time.perf_counter()
        try:
            rec = evaluate_arch(arch, train, val, num_classes=K, cfg=c, device_shared=shared)
        except Exception as e:  # noqa: BLE001
            free_memory(device)
            rec = dict(status="error", error=short(e), reward=float("nan"), train_seconds=0.0, eval_seconds=0.0, peak_mem_mb=base_mb or 0.0, macs=-1, params=-1)
        return proxy_row(name, arch, rec, time.perf_counter() - t, c.epochs, base_mb)

    # main table: 7 archs at the default ProxyConfig (bf16 autocast + channels_last on CUDA)
    res["rows"] = []
    table = archs(P["randoms"])
    arch_of = dict(table)
    for name, arch in table:
        row = evaluate(name, arch, cfg())
        row["deform_convs"] = count_deform(arch)
        res["rows"].append(row)
        print(f"  proxy {name}: {row['epoch_s']:.2f} s/epoch, est {row['est_paper_s']:.1f} s/arch ({row['status']})", flush=True)
        save()
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    res["median_est_paper_s"] = statistics.median([r["est_paper_s"] for r in ok]) if ok else None

    # the torchvision peer: FPN + FCOSHead on the same features, same optimiser and schedule
    try:
        import proxy as proxy_bench  # benchmarks/proxy.py

        if stream:
            res["peer"] = {"note": "skipped: features streamed (the peer indexes device-resident features)"}
        else:
            setting = dict(channels=P["channels"], batch=P["batch"], epochs=E)
            feats, boxes, labels = raw_train
            peak_reset(device)
            s = proxy_bench.torchvision_peer((feats, boxes, labels), setting, K, P["width"], device)
            res["peer"] = dict(
                arch="torchvision FPN + FCOSHead",
                epochs=E,
                train_s=s,
                epoch_s=s / E,
                est_paper_train_s=PAPER_EPOCHS * s / E,
                peak_mb=None if base_mb is None else peak_mb(device) - base_mb,
            )
    except Exception as e:  # noqa: BLE001 - reported, the suite goes on
        res["peer"] = {"error": short(e)}
    save()

    # how many evaluations fit beside the features, and archs/hour with that many at once
    peaks = [r["peak_mb"] for r in ok if r["peak_mb"]]
    if device.type == "cuda" and peaks:
        total_mb = torch.cuda.get_device_properties(device).total_memory / 2**20
        fit = max(1, int(0.9 * (total_mb - base_mb) // max(peaks)))
        res["fit"] = dict(total_mb=total_mb, resident_mb=base_mb, worst_eval_peak_mb=max(peaks), median_eval_peak_mb=statistics.median(peaks), evaluations_per_gpu=fit)
    else:
        fit = 2
        res["fit"] = dict(note="CPU: memory is the host's; concurrency measured at 1-2")
    res["concurrency"] = []
    rand = [(n, a) for n, a in table if n.startswith("random")] or table
    one = next(r for r in res["rows"] if r["arch"] == rand[0][0])
    for k in sorted({2, min(4, fit), min(8, fit)} - {1}):
        if k > fit or budget.left() < 3 * one["wall_s"] + 60:
            res["concurrency"].append(dict(slots=k, note="skipped (memory or budget)"))
            continue
        t = time.perf_counter()
        try:
            with ThreadPoolExecutor(k) as pool:
                rows = list(pool.map(lambda i: evaluate(rand[i % len(rand)][0], rand[i % len(rand)][1], cfg(seed=i), shared=True), range(k)))
            wall = time.perf_counter() - t
            single = sum(next(r["wall_s"] for r in res["rows"] if r["arch"] == row["arch"]) for row in rows)
            speedup = single / wall
            med = res["median_est_paper_s"] or float("nan")
            res["concurrency"].append(
                dict(slots=k, wall_s=wall, sum_single_wall_s=single, speedup=speedup, archs_per_hour_est=speedup * 3600 / med, statuses=[r["status"] for r in rows])
            )
        except Exception as e:  # noqa: BLE001
            res["concurrency"].append(dict(slots=k, error=short(e)))
        save()
    med = res["median_est_paper_s"]
    if med:
        res["archs_per_hour_one_slot"] = 3600 / med

    # host syncs per training step, sync_free off/on (CUDA only)
    res["syncs"] = []
    if device.type == "cuda":
        for sync_free in (False, True):
            c = cfg(epochs=1, sync_free=sync_free)
            torch.manual_seed(0)
            model = ProxyModel(resolve("fpn-fcos"), in_channels=tuple(f.shape[1] for f in train.feats), num_classes=K, cfg=c).to(device)
            model = model.to(memory_format=torch.channels_last)
            steps = math.ceil(len(train) / P["batch"])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode(1)
                try:
                    train_proxy(model, train, c)
                    sync(device)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            n = sum("synchroniz" in str(w.message).lower() for w in caught)
            res["syncs"].append(dict(sync_free=sync_free, steps=steps, syncs=n, per_step=n / steps))
        save()

    # ablation: each switch from the default, one epoch, fpn-fcos and nas-fcos
    switches = [
        ("default (bf16 autocast, channels_last)", {}),
        ("amp off (fp32)", dict(amp=False)),
        ("channels_last off", dict(channels_last=False)),
        ("sync_free on", dict(sync_free=True)),
        ("deform fp16", dict(deform_dtype="float16")),
        ("all on (sync_free, deform fp16)", dict(sync_free=True, deform_dtype="float16")),
    ]
    res["ablation"] = []
    for name in P["ablation_archs"]:
        for label, kw in switches:
            if "deform" in label and name == "fpn-fcos":
                continue
            est = next(r["epoch_s"] for r in res["rows"] if r["arch"] == name)
            if budget.left() < 2 * est + 90:
                res["ablation"].append(dict(arch=name, switch=label, note="skipped (budget)"))
                continue
            row = evaluate(name, arch_of[name], cfg(epochs=1, **kw))
            row["switch"] = label
            res["ablation"].append(row)
            print(f"  proxy ablation {name} / {label}: {row['wall_s']:.1f} s ({row['status']})", flush=True)
            save()

    # deformable convs in half: reward of 5 archs with deformable convs, fp32 vs half
    res["deform_accuracy"] = []
    sign = -1 if P["accuracy_pick"] == "most" else 1
    by_deform = sorted([r for r in ok if r["deform_convs"] > 0], key=lambda r: sign * r["deform_convs"])[: P["accuracy_archs"]]
    for dt in ("float16",):  # bf16: no deform kernel (the deform section shows it)
        rows = []
        for r in by_deform:
            if budget.left() < r["wall_s"] + 60:
                rows.append(dict(arch=r["arch"], note="skipped (budget)"))
                continue
            half = evaluate(r["arch"], r["arch_string"], cfg(deform_dtype=dt))
            rows.append(dict(arch=r["arch"], deform_convs=r["deform_convs"], reward_fp32=r["reward"], reward_half=half["reward"],
                             abs_delta=abs(half["reward"] - r["reward"]) if half["status"] == "ok" else None,
                             wall_fp32_s=r["wall_s"], wall_half_s=half["wall_s"], status=half["status"], error=half["error"]))  # fmt: skip
            save()
            if half["status"] != "ok":
                break  # this dtype is not supported: the others would fail alike
        done = [x for x in rows if x.get("abs_delta") is not None]
        rank32 = np.argsort(np.argsort([-x["reward_fp32"] for x in done])).tolist()
        rankh = np.argsort(np.argsort([-x["reward_half"] for x in done])).tolist()
        res["deform_accuracy"].append(
            dict(dtype=dt, archs=rows, rank_order_kept=rank32 == rankh if done else None, max_abs_delta=max((x["abs_delta"] for x in done), default=None))
        )

    # torch.compile of the training forward: compile seconds vs seconds saved per epoch
    res["compile"] = []
    if args.small and not args.compile_backend:
        res["compile"].append(dict(note="skipped with --small (give --compile-backend to try)"))
    else:
        backend = args.compile_backend or "inductor"
        for name in ("fpn-fcos", "nas-fcos"):
            eager = next(r for r in res["rows"] if r["arch"] == name)
            if budget.left() < 4 * eager["wall_s"] + 150:
                res["compile"].append(dict(arch=name, note="skipped (budget)"))
                continue
            try:
                walls = {}
                for e in (1, 2):
                    torch._dynamo.reset()
                    walls[e] = evaluate(name, arch_of[name], cfg(epochs=e, compile=backend))
                epoch = walls[2]["train_s"] - walls[1]["train_s"]
                compile_s = walls[1]["train_s"] - epoch
                saved = eager["epoch_s"] - epoch
                res["compile"].append(dict(arch=name, backend=backend, eager_epoch_s=eager["epoch_s"], compiled_epoch_s=epoch, compile_s=compile_s,
                                           saved_per_evaluation_s=PAPER_EPOCHS * saved - compile_s, pays=PAPER_EPOCHS * saved > compile_s))  # fmt: skip
            except Exception as e:  # noqa: BLE001
                res["compile"].append(dict(arch=name, backend=backend, error=short(e)))
            save()
    train = val = raw_train = None  # the device memory goes before the next section (evaluate() is not called again)
    return res


# ------------------------------------------------------------------------------ section: train
def synthetic_batch(n: int, size: tuple[int, int], num_classes: int, device: torch.device, seed: int = 0):
    """``n`` random images (normalised, for ours; [0, 1], for torchvision) and 7 random boxes each."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    raw = torch.rand(n, 3, h, w, generator=g)
    targets = []
    for _ in range(n):
        xy = torch.rand(7, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(7, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device), "labels": torch.randint(0, num_classes, (7,), generator=g).to(device)})
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    ours = torch.zeros(n, 3, hp, wp)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    ours[:, :, :h, :w] = (raw - mean) / std
    return ours.to(device), [r.to(device) for r in raw], targets


def model_specs(T: dict) -> list[tuple[str, DetectorSpec | None]]:
    w128, w256 = T["widths"][128], T["widths"][256]
    b, K = T["backbone"], T["classes"]
    return [
        (f"FPN-FCOS @{w256}", DetectorSpec(num_classes=K, backbone=b, decoder="fpn-fcos", width=w256)),
        (f"NAS-FCOS @{w128}", DetectorSpec(num_classes=K, backbone=b, decoder="nas-fcos", width=w128)),
        (f"NAS-FCOS @{w128}-{w256}", DetectorSpec(num_classes=K, backbone=b, decoder="nas-fcos", width=w128, head_width=w256)),
        (f"NAS-FCOS @{w256}", DetectorSpec(num_classes=K, backbone=b, decoder="nas-fcos", width=w256)),
        ("torchvision FCOS", None),
    ]


def our_train_step(spec: DetectorSpec, device: torch.device, *, amp_dtype="float16", channels_last=False, sync_free=False, deform_dtype="float32"):
    """One iteration as ``nasfcos.engine.train.train`` runs it (LossSums, combine, finite check, scaler, SGD)."""
    torch.manual_seed(0)
    model = build_detector(spec).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.fcos.sync_free = sync_free
    set_deform_dtype(model, deform_dtype)
    model.train()
    cfg = TrainConfig(base_lr=1e-4)  # small: random weights must stay finite for a few steps
    opt = torch.optim.SGD(param_groups(model, cfg), lr=cfg.base_lr, momentum=cfg.momentum)
    amp = device.type == "cuda"
    step = LossSums(model, amp=amp, amp_dtype=AMP_DTYPES[amp_dtype])
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == "float16")

    def run(images, raw, targets):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss = sum(model.fcos.combine(step(images, targets)).values())
        if not sync_free and not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return run


def tv_train_step(T: dict, device: torch.device, peer: str):
    torch.manual_seed(0)
    model = torchvision_fcos(T["backbone"], T["classes"], T["size"], peer).to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def run(images, raw, targets):
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = sum(model(raw, targets).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return run


def train_throughput(make, T: dict, device: torch.device) -> dict:
    """images/s of ``make()``'s step at the largest batch <= T['batch'] that fits."""
    batch = T["batch"]
    while batch >= 1:
        try:
            free_memory(device)
            peak_reset(device)
            run = make()
            images, raw, targets = synthetic_batch(batch, T["size"], T["classes"], device)
            for _ in range(T["warmup"]):
                run(images, raw, targets)
            sync(device)
            t = time.perf_counter()
            for _ in range(T["iters"]):
                run(images, raw, targets)
            sync(device)
            s = (time.perf_counter() - t) / T["iters"]
            return dict(batch=batch, s_per_iter=s, images_per_s=batch / s, peak_mb=peak_mb(device))
        except Exception as e:  # noqa: BLE001
            if not is_oom(e) or batch == 1:
                return dict(batch=batch, error=short(e))
            del e
            batch //= 2
        finally:
            run = images = raw = targets = None
    return dict(error="no batch fits")


def run_train(S: dict, device: torch.device, budget: Budget, args, out: dict, save) -> dict:
    T = S["train"]
    res: dict = {
        "setting": dict(size=T["size"], batch=T["batch"], backbone=T["backbone"], amp="fp16 autocast + GradScaler" if device.type == "cuda" else "off (CPU)", iters=T["iters"])
    }
    out["train"] = res
    res["rows"] = []
    for name, spec in model_specs(T):
        make = (lambda spec=spec: our_train_step(spec, device)) if spec else (lambda: tv_train_step(T, device, args.tv_peer))
        row = dict(model=name, **train_throughput(make, T, device))
        res["rows"].append(row)
        print(f"  train {name}: {row.get('images_per_s', float('nan')):.2f} img/s (batch {row.get('batch')}) {row.get('error', '')}", flush=True)
        save()
    tv = next((r for r in res["rows"] if r["model"] == "torchvision FCOS" and "images_per_s" in r), None)
    for r in res["rows"]:
        if tv and "images_per_s" in r:
            r["x torchvision"] = r["images_per_s"] / tv["images_per_s"]
    res["ablation"] = []
    specs = dict(model_specs(T))
    w128, w256 = T["widths"][128], T["widths"][256]
    ablations = [
        (f"FPN-FCOS @{w256}", "amp bf16 (no GradScaler)", dict(amp_dtype="bfloat16")),
        (f"FPN-FCOS @{w256}", "channels_last", dict(channels_last=True)),
        (f"FPN-FCOS @{w256}", "sync_free", dict(sync_free=True)),
        (f"FPN-FCOS @{w256}", "all three", dict(amp_dtype="bfloat16", channels_last=True, sync_free=True)),
        (f"NAS-FCOS @{w128}-{w256}", "deform fp16", dict(deform_dtype="float16")),
        (f"NAS-FCOS @{w128}-{w256}", "all (bf16, channels_last, sync_free, deform fp16)", dict(amp_dtype="bfloat16", channels_last=True, sync_free=True, deform_dtype="float16")),
    ]
    for name, label, kw in ablations:
        if kw.get("deform_dtype") and not T["half_deform"]:
            continue
        base = next(r for r in res["rows"] if r["model"] == name)
        if budget.left() < 3 * T["iters"] * base.get("s_per_iter", 1.0) + 30:
            res["ablation"].append(dict(model=name, switch=label, note="skipped (budget)"))
            continue
        row = dict(model=name, switch=label, **train_throughput(lambda name=name, kw=kw: our_train_step(specs[name], device, **kw), T, device))
        if "images_per_s" in row and "images_per_s" in base:
            row["x default"] = row["images_per_s"] / base["images_per_s"]
        res["ablation"].append(row)
        save()
    return res


# ------------------------------------------------------------------------------ section: infer
def run_infer(S: dict, device: torch.device, budget: Budget, args, out: dict, save) -> dict:
    INF = S["infer"]
    h, w = INF["size"]
    res: dict = {"setting": dict(size=INF["size"], batch=1, iters=INF["iters"], postprocess="loaded: class bias -2, every location a candidate")}
    out["infer"] = res
    image = torch.rand(3, h, w, device=device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(3, 1, 1)
    x = ((image - mean) / std)[None]
    T = dict(S["train"], classes=INF["classes"], backbone=INF["backbone"], size=INF["size"])
    res["rows"], res["ablation"], res["postprocess"] = [], [], []

    def ours(spec, *, amp, channels_last=False, deform_dtype="float32", fold_bn=True):
        torch.manual_seed(0)
        model = build_detector(spec).to(device).eval()
        with torch.no_grad():
            model.decoder.head.cls_logits.bias.fill_(-2.0)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        set_deform_dtype(model, deform_dtype)
        xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x

        def fn():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                return model.predict(xi, [(h, w)], fold_bn=fold_bn)

        return fn, model

    def tv(*, amp):
        torch.manual_seed(0)
        model = torchvision_fcos(INF["backbone"], INF["classes"], INF["size"], args.tv_peer).to(device).eval()
        with torch.no_grad():
            model.head.classification_head.cls_logits.bias.fill_(-2.0)

        def fn():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                return model([image])

        return fn, model

    def latency(fn) -> dict:
        try:
            free_memory(device)
            ts = seconds(fn, device, warmup=INF["warmup"], iters=INF["iters"])
            return dict(median_ms=1e3 * statistics.median(ts), p90_ms=1e3 * p90(ts), detections=len(fn()[0]["scores"]))
        except Exception as e:  # noqa: BLE001
            return dict(error=short(e))

    amps = (False, True) if device.type == "cuda" else (False,)
    for name, spec in model_specs(T):
        for amp in amps:
            fn, _ = ours(spec, amp=amp) if spec else tv(amp=amp)
            row = dict(model=name, precision="fp16 autocast" if amp else "fp32", **latency(fn))
            res["rows"].append(row)
            print(f"  infer {name} {row['precision']}: {row.get('median_ms', float('nan')):.1f} ms", flush=True)
            fn = None
            save()
    for r in res["rows"]:
        peer = next((p for p in res["rows"] if p["model"] == "torchvision FCOS" and p["precision"] == r["precision"]), None)
        if peer and "median_ms" in r and "median_ms" in peer:
            r["x torchvision"] = r["median_ms"] / peer["median_ms"]
    specs = dict(model_specs(T))
    w128, w256 = T["widths"][128], T["widths"][256]
    amp = device.type == "cuda"
    for name, label, kw in (
        (f"FPN-FCOS @{w256}", "frozen BN not folded", dict(fold_bn=False)),
        (f"FPN-FCOS @{w256}", "channels_last", dict(channels_last=True)),
        (f"NAS-FCOS @{w128}", "channels_last", dict(channels_last=True)),
        (f"NAS-FCOS @{w128}", "deform fp16", dict(deform_dtype="float16")),
        (f"NAS-FCOS @{w128}", "channels_last + deform fp16", dict(channels_last=True, deform_dtype="float16")),
    ):
        if kw.get("deform_dtype") and not S["train"]["half_deform"]:
            continue
        if budget.left() < 30:
            res["ablation"].append(dict(model=name, switch=label, note="skipped (budget)"))
            continue
        fn, _ = ours(specs[name], amp=amp, **kw)
        res["ablation"].append(dict(model=name, switch=label, precision="fp16 autocast" if amp else "fp32", **latency(fn)))
        save()

    # post-processing alone on the loaded outputs of FPN-FCOS: ours, the per-level loop, torchvision's
    _, model = ours(specs[f"FPN-FCOS @{w256}"], amp=False)
    with torch.inference_mode():
        outs = model(x)
        for label, fn in (("ours (no per-level loop)", lambda: model.fcos.postprocess(outs, [(h, w)])),
                          ("ours before #15 (per-level loop)", lambda: reference_postprocess(model.fcos, outs, [(h, w)])),
                          ("torchvision postprocess_detections", _tv_postprocess(outs, (h, w), device))):  # fmt: skip
            res["postprocess"].append(dict(impl=label, **latency(fn)) if fn else dict(impl=label, note="unavailable"))
    save()
    return res


def _tv_postprocess(outs, hw, device):
    """torchvision FCOS.postprocess_detections on the same level outputs (its own constants)."""
    try:
        from torchvision.models.detection import FCOS as TVFCOS

        fcos = TVFCOS(_NoBackbone(), outs[0][0].shape[1]).to(device)
    except Exception:  # noqa: BLE001
        return None
    N = outs[0][0].shape[0]
    head = {
        "cls_logits": [c.permute(0, 2, 3, 1).reshape(N, -1, c.shape[1]) for c, _, _ in outs],
        "bbox_regression": [r.permute(0, 2, 3, 1).reshape(N, -1, 4) for _, r, _ in outs],
        "bbox_ctrness": [t.permute(0, 2, 3, 1).reshape(N, -1, 1) for _, _, t in outs],
    }
    anchors = []
    for (c, _, _), s in zip(outs, (8, 16, 32, 64, 128), strict=True):
        H, W = c.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(H, device=device) * s + s // 2, torch.arange(W, device=device) * s + s // 2, indexing="ij")
        ctr = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).float()
        anchors.append(torch.cat([ctr - s / 2, ctr + s / 2], 1))
    return lambda: fcos.postprocess_detections(head, [anchors], [hw])


class _NoBackbone(nn.Module):
    """A stand-in backbone: torchvision FCOS is built only for its postprocess_detections."""

    out_channels = 32

    def forward(self, x):
        return OrderedDict()


# ------------------------------------------------------------------------------ section: data
def run_data(S: dict, device: torch.device, budget: Budget, args, out: dict, save) -> dict:
    from torch.utils.data import DataLoader

    from nasfcos.data.synthetic import SHAPES, make_synthetic
    from nasfcos.data.transforms import build_transforms, collate
    from nasfcos.data.voc import VOCDetection

    D = S["data"]
    workers = 0 if args.small else (os.cpu_count() or 1)
    res: dict = {
        "setting": dict(
            images=D["images"],
            image_size=D["image_size"],
            batch=D["batch"],
            workers=workers,
            transforms=f"decode + resize {D['min_size']}/{D['max_size']} + flip + normalise + collate",
        )
    }
    out["data"] = res
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = make_synthetic(tmp, num_train=D["images"], num_val=0, image_size=tuple(D["image_size"]), seed=0)
        res["setting"]["make_s"] = time.perf_counter() - t
        ds = VOCDetection(paths["voc_root"], image_set="train", classes=SHAPES, transforms=build_transforms(train=True, min_size=D["min_size"], max_size=D["max_size"]))
        loader = DataLoader(ds, batch_size=D["batch"], shuffle=True, num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        for _ in loader:  # warm-up pass: worker start-up and the page cache
            break
        t = time.perf_counter()
        n = 0
        for _ in range(D["passes"]):
            for images, _targets in loader:
                n += images.shape[0]
        s = time.perf_counter() - t
        del loader
    res["images_per_s"] = n / s
    print(f"  data: {res['images_per_s']:.1f} img/s with {workers} workers", flush=True)
    return res


# ------------------------------------------------------------------------------ section: ddp
# the released FPN with its deformable convs swapped for sep_conv_3x3: 23 trainable BatchNorm2d
BN_ARCH = "fpn=[3,3,0,0,1][3,3,0,0,1][4,3,0,3,1][1,3,0,3,1][5,3,0,0,1][4,7,0,0,1][7,2,0,0,1];head=fcos;share=0"
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}  # the ranks' cuBLAS/cuDNN in fp32, as the in-process run's (flags below)


def _torchrun_one_rank(spec, dataset, cfg, out: Path) -> float:
    """The job through ``torchrun --standalone`` with one rank (NCCL over ``env://``): seconds."""
    import subprocess

    from nasfcos.engine.distributed import JOB, write_job

    write_job(spec, dataset, cfg, out, device="cuda")
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "1", "-m", "nasfcos.engine.distributed", str(out / JOB)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **NO_TF32})
    if proc.returncode:
        raise RuntimeError(f"torchrun exit {proc.returncode}: {(proc.stderr or proc.stdout)[-400:]}")
    return time.perf_counter() - t


def run_ddp(S: dict, device: torch.device, budget: Budget, args, out: dict, save) -> dict:
    from nasfcos.data.synthetic import SHAPES, make_synthetic
    from nasfcos.data.transforms import build_transforms
    from nasfcos.data.voc import VOCDetection
    from nasfcos.engine.checkpoint import load_checkpoint
    from nasfcos.engine.distributed import train_on_devices
    from nasfcos.engine.train import train

    D = S["ddp"]
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    res: dict = {"setting": dict(gpus=gpus, arch=BN_ARCH, images=D["images"], size=D["size"], iterations=D["iterations"]), "rows": []}
    out["ddp"] = res
    if gpus == 0:
        res["note"] = "needs CUDA: SyncBatchNorm and NCCL are CUDA-only (the gloo path is tests/test_distributed.py's)"
        print(f"  ddp: {res['note']}", flush=True)
        return res

    def max_diff(a: dict, b: dict) -> float:
        keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
        return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_synthetic(tmp / "data", num_train=D["images"], num_val=0, image_size=(D["size"], D["size"]), seed=0)

        def dataset(size: int):
            tf = build_transforms(train=True, min_size=size, max_size=10**9, crop=size)
            return VOCDetection(paths["voc_root"], image_set="train", classes=SHAPES, transforms=tf)

        # accuracy: fp32 (no AMP, no TF32), 4 images per step, 2 per rank
        spec = DetectorSpec(num_classes=len(SHAPES), backbone="tiny", decoder=BN_ARCH, width=32)
        cfg = TrainConfig(iterations=D["iterations"], batch_size=4, base_lr=0.01, warmup_iters=1, checkpoint_every=D["iterations"], log_every=1, num_workers=0, amp=False)
        ds = dataset(D["size"])
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            t = time.perf_counter()
            one = load_checkpoint(train(spec, ds, cfg, tmp / "one", device="cuda:0").checkpoint)
            one_s = time.perf_counter() - t
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if gpus >= 2:
            t = time.perf_counter()
            saved = dict(os.environ)
            os.environ.update(NO_TF32)  # the ranks inherit it
            try:
                two = load_checkpoint(train_on_devices(spec, ds, cfg, tmp / "two", devices=["cuda:0", "cuda:1"]).checkpoint)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            row = dict(check="SyncBatchNorm, 2 ranks (NCCL) vs 1 GPU", world=two["world_size"], max_abs_diff=max_diff(one["model"], two["model"]), tolerance=1e-4,
                       seconds=time.perf_counter() - t, one_gpu_s=one_s)  # fmt: skip
        else:
            s = _torchrun_one_rank(spec, ds, cfg, tmp / "rank")
            rank = load_checkpoint(tmp / "rank" / "checkpoint.pt")
            row = dict(check="torchrun --standalone, 1 rank (NCCL env://) vs in-process", world=rank["world_size"], max_abs_diff=max_diff(one["model"], rank["model"]),
                       tolerance=1e-4, seconds=s, one_gpu_s=one_s, note="SyncBatchNorm not run: 1 GPU")  # fmt: skip
        row["ok"] = row["max_abs_diff"] <= row["tolerance"]
        res["rows"].append(row)
        print(f"  ddp: {row['check']}: max |diff| {row['max_abs_diff']:.2e} ({'ok' if row['ok'] else 'OVER'} {row['tolerance']})", flush=True)
        save()

        # throughput: images/s of 1 GPU vs 2 ranks at the same per-GPU batch (AMP, the default)
        if gpus >= 2 and budget.left() > 60:
            size = D["throughput_size"]
            spec = DetectorSpec(num_classes=len(SHAPES), backbone=D["throughput_backbone"], decoder=BN_ARCH, width=128)
            big = dataset(size)
            for world in (1, 2):
                cfg = TrainConfig(
                    iterations=D["throughput_iters"], batch_size=4 * world, base_lr=0.001, warmup_iters=1, checkpoint_every=D["throughput_iters"], log_every=1, num_workers=2
                )
                t = time.perf_counter()
                train_on_devices(spec, big, cfg, tmp / f"tp{world}", devices=[f"cuda:{i}" for i in range(world)])
                wall = time.perf_counter() - t
                res["rows"].append(dict(check=f"throughput {world} GPU(s), {D['throughput_backbone']} {size}x{size}, 4 images/GPU", world=world, seconds=wall,
                                        images_per_s=cfg.iterations * cfg.batch_size / wall, note="wall incl. start-up"))  # fmt: skip
                save()
    return res


# ------------------------------------------------------------------------------ report
def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(none)\n"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    env = res.get("env", {})
    md = [f"# GPU suite ({env.get('date', '')})\n", f"{env.get('device_name', '')}; torch {env.get('torch')}, torchvision {env.get('torchvision')}, "
          f"Python {env.get('python')}, {env.get('cpus')} CPUs; `{env.get('command', '')}`; {res.get('elapsed_s', 0):.0f} s\n"]  # fmt: skip
    if "deform" in res:
        md += ["\n## deform_conv2d forward+backward\n", table(res["deform"].get("rows", []), ["shape", "op", "dtype", "ms", "x conv fp32", "note"])]
    if "proxy" in res:
        p = res["proxy"]
        md += [f"\n## Proxy seconds per architecture\n\nSetting: {p.get('setting')}\n\n",
               table(p.get("rows", []), ["arch", "status", "deform_convs", "epoch_s", "eval_s", "setup_s", "est_paper_s", "peak_mb", "reward"]),
               f"\nMedian estimated s/arch at {PAPER_EPOCHS} epochs: {fmt(p.get('median_est_paper_s'))}; one slot: {fmt(p.get('archs_per_hour_one_slot'))} archs/h\n",
               f"\nPeer: {p.get('peer')}\n\nFit: {p.get('fit')}\n\n", table(p.get("concurrency", []), ["slots", "wall_s", "sum_single_wall_s", "speedup", "archs_per_hour_est", "note", "error"]),
               "\nHost syncs per step:\n\n", table(p.get("syncs", []), ["sync_free", "steps", "syncs", "per_step"]),
               "\nAblation (1 epoch):\n\n", table(p.get("ablation", []), ["arch", "switch", "status", "wall_s", "train_s", "eval_s", "peak_mb", "reward", "note"]),
               "\nDeformable convs in half precision:\n\n"]  # fmt: skip
        for d in p.get("deform_accuracy", []):
            md += [f"\n{d['dtype']}: rank order kept {fmt(d.get('rank_order_kept'))}, max |delta reward| {fmt(d.get('max_abs_delta'))}\n\n",
                   table(d.get("archs", []), ["arch", "deform_convs", "reward_fp32", "reward_half", "abs_delta", "wall_fp32_s", "wall_half_s", "status", "note"])]  # fmt: skip
        md += [
            "\ntorch.compile:\n\n",
            table(p.get("compile", []), ["arch", "backend", "eager_epoch_s", "compiled_epoch_s", "compile_s", "saved_per_evaluation_s", "pays", "note", "error"]),
        ]
    if "train" in res:
        t = res["train"]
        md += [f"\n## Training throughput\n\nSetting: {t.get('setting')}\n\n", table(t.get("rows", []), ["model", "batch", "images_per_s", "x torchvision", "s_per_iter", "peak_mb", "error"]),
               "\nAblation:\n\n", table(t.get("ablation", []), ["model", "switch", "batch", "images_per_s", "x default", "peak_mb", "note", "error"])]  # fmt: skip
    if "infer" in res:
        i = res["infer"]
        md += [f"\n## Inference latency, batch 1\n\nSetting: {i.get('setting')}\n\n", table(i.get("rows", []), ["model", "precision", "median_ms", "p90_ms", "x torchvision", "detections", "error"]),
               "\nAblation:\n\n", table(i.get("ablation", []), ["model", "switch", "precision", "median_ms", "p90_ms", "note", "error"]),
               "\nPost-processing alone (FPN-FCOS outputs, loaded):\n\n", table(i.get("postprocess", []), ["impl", "median_ms", "p90_ms", "detections", "note", "error"])]  # fmt: skip
    if "data" in res:
        d = res["data"]
        md += [f"\n## Data pipeline\n\nSetting: {d.get('setting')}\n\nimages/s: {fmt(d.get('images_per_s'))}\n"]
    if "ddp" in res:
        d = res["ddp"]
        md += [f"\n## Data-parallel training (torchrun)\n\nSetting: {d.get('setting')}\n\n{d.get('note', '')}\n\n",
               table(d.get("rows", []), ["check", "world", "max_abs_diff", "tolerance", "ok", "seconds", "one_gpu_s", "images_per_s", "note"])]  # fmt: skip
    if res.get("errors"):
        md += ["\n## Errors\n\n"] + [f"- {e}\n" for e in res["errors"]]
    return "".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for results.json and results.md")
    ap.add_argument("--small", action="store_true", help="tiny shapes: seconds on CPU (smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    ap.add_argument("--proxy-epochs", type=int, default=None, help="epochs measured per arch (default 2; 1 with --small)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget; optional parts skip when short (default 420; 600 with --small)")
    ap.add_argument("--compile-backend", default="", help="torch.compile backend of the compile ablation (default inductor; off with --small)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --small on CPU, torch's otherwise)")
    ap.add_argument("--tv-peer", choices=("frozen", "default"), default="frozen", help="torchvision FCOS as built for pretrained weights (frozen) or without (default)")
    args = ap.parse_args(argv)
    if args.proxy_epochs is None:
        args.proxy_epochs = 1 if args.small else 2
    budget = Budget(args.budget_s if args.budget_s is not None else (600 if args.small else 420))
    S = SMALL if args.small else FULL
    device = torch.device(args.device)
    if args.threads or (args.small and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)  # a shared small CPU: one thread avoids OpenMP waits
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes throughout (both peers alike)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import torchvision

    res: dict = {
        "env": dict(
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            torch=torch.__version__,
            torchvision=torchvision.__version__,
            python=platform.python_version(),
            cpus=os.cpu_count(),
            device=str(device),
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            cuda=torch.version.cuda,
            small=args.small,
            sections=only,
            threads=torch.get_num_threads(),
        ),  # fmt: skip
        "errors": [],
    }
    lock = threading.Lock()

    def save() -> None:
        with lock:
            res["elapsed_s"] = budget.elapsed()
            tmp = out_dir / "results.json.tmp"
            tmp.write_text(json.dumps(res, indent=1, default=str))
            tmp.replace(out_dir / "results.json")
            (out_dir / "results.md").write_text(markdown(res))

    save()
    runners = dict(
        deform=lambda: res.__setitem__("deform", run_deform(S["deform"], device, budget)),
        proxy=lambda: run_proxy(S, device, budget, args, res, save),
        train=lambda: run_train(S, device, budget, args, res, save),
        infer=lambda: run_infer(S, device, budget, args, res, save),
        data=lambda: run_data(S, device, budget, args, res, save),
        ddp=lambda: run_ddp(S, device, budget, args, res, save),
    )
    for name in SECTIONS:
        if name not in only:
            continue
        print(f"[{budget.elapsed():6.1f} s] {name}", flush=True)
        try:
            runners[name]()
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
            res["errors"].append(f"{name}: {short(e)}")
            traceback.print_exc()
        free_memory(device)
        save()
    print(f"[{budget.elapsed():6.1f} s] done: {out_dir / 'results.json'}, {out_dir / 'results.md'}", flush=True)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
