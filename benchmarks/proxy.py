"""Seconds per architecture on the proxy task (NAS-FCOS §4.1), with torchvision FCOS as the peer.

Features are random float16 tensors of the right shapes (the time does not depend
on their values) with random boxes, so the script needs no dataset or weights:

    python benchmarks/proxy.py --setting paper     # 4000/1715 samples, R-50 C2..C5 at 384x384, batch 200, 15 epochs
    python benchmarks/proxy.py --setting cpu       # tiny backbone channels at 96x96, 100/30 samples, batch 25

Peer: torchvision's FPN + FCOSHead at the same width trained with the same optimiser,
batches and epochs on the same features, its loss computed by
``torchvision.models.detection.FCOS.compute_loss`` (target matching every step, as
torchvision does). No prefect here.
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from nasfcos.arch import Arch
from nasfcos.engine.proxy import ProxyConfig, evaluate_arch, prepare_split

SETTINGS = {
    # channels of C2..C5, crop size, meta-train / meta-val sizes, batch, epochs
    "paper": dict(channels=(256, 512, 1024, 2048), size=384, n_train=4000, n_val=1715, batch=200, epochs=15),
    # CPU-sized: the tiny backbone's channels at 96x96, 100 / 30 samples (deformable convs are
    # ~30x slower than plain convs on CPU, see docs/user-guide.md)
    "cpu": dict(channels=(16, 32, 64, 128), size=96, n_train=100, n_val=30, batch=25, epochs=15),
}


def fake_split(n: int, channels, size: int, num_classes: int, seed: int, device):
    g = torch.Generator().manual_seed(seed)
    feats = {f"C{i + 2}": torch.randn(n, c, size // s, size // s, generator=g).to(torch.float16) for i, (c, s) in enumerate(zip(channels, (4, 8, 16, 32), strict=True))}
    boxes, labels = [], []
    for _ in range(n):
        m = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(m, 2, generator=g) * size * 0.8
        wh = 8 + torch.rand(m, 2, generator=g) * size * 0.5
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=size)], 1).numpy())
        labels.append(torch.randint(0, num_classes, (m,), generator=g).numpy())
    return prepare_split(feats, boxes, labels, num_classes=num_classes, device=device), (feats, boxes, labels)


def torchvision_peer(raw, setting: dict, num_classes: int, width: int, device) -> float:
    """Seconds to train torchvision FPN + FCOSHead on the same features (same schedule)."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    feats, boxes, labels = raw
    maps = [feats[k].to(device) for k in ("C3", "C4", "C5")]
    targets = [{"boxes": torch.as_tensor(b, device=device), "labels": torch.as_tensor(lab, device=device)} for b, lab in zip(boxes, labels, strict=True)]
    fpn = FeaturePyramidNetwork(list(setting["channels"][1:]), width, extra_blocks=LastLevelP6P7(width, width)).to(device)
    head = FCOSHead(width, 1, num_classes).to(device)
    body = nn.Identity()
    body.out_channels = width
    tv = FCOS(body, num_classes, head=head).to(device)
    opt = torch.optim.Adam(list(fpn.parameters()) + list(head.parameters()), lr=8e-4)
    n, bs = len(boxes), setting["batch"]
    autocast = device.type == "cuda"
    sync(device)
    t0 = time.perf_counter()
    for _ in range(setting["epochs"]):
        perm = torch.randperm(n, device=device)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                pyr = list(fpn(OrderedDict((str(k), m[idx].float()) for k, m in enumerate(maps))).values())
                out = head(pyr)
            out = {k: v.float() for k, v in out.items()}
            anchors, sizes = [], []
            for p, s in zip(pyr, (8, 16, 32, 64, 128), strict=True):
                H, W = p.shape[-2:]
                ys, xs = torch.meshgrid(torch.arange(H, device=device) * s + s // 2, torch.arange(W, device=device) * s + s // 2, indexing="ij")
                c = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).float()
                anchors.append(torch.cat([c - s / 2, c + s / 2], 1))
                sizes.append(H * W)
            a = torch.cat(anchors)
            loss = sum(tv.compute_loss([targets[j] for j in idx.tolist()], out, [a] * len(idx), sizes).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    sync(device)
    return time.perf_counter() - t0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--random", type=int, default=3, help="number of random archs (default: %(default)s)")
    ap.add_argument("--epochs", type=int, help="override the setting's epochs (timing scales linearly)")
    ap.add_argument("--no-peer", action="store_true", help="skip the torchvision FCOS peer")
    args = ap.parse_args()
    setting = dict(SETTINGS[args.setting])
    if args.epochs is not None:
        setting["epochs"] = args.epochs
    device = torch.device(args.device)
    K = 20
    t = time.perf_counter()
    train, raw = fake_split(setting["n_train"], setting["channels"], setting["size"], K, 0, device)
    val, _ = fake_split(setting["n_val"], setting["channels"], setting["size"], K, 1, device)
    print(f"# proxy benchmark: setting={args.setting} {setting} device={device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch {torch.__version__}; "
          f"data prepared in {time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
    cfg = ProxyConfig(batch_size=setting["batch"], epochs=setting["epochs"], eval_batch_size=setting["batch"])
    rng = np.random.default_rng(0)
    archs = [("fpn-fcos", "fpn-fcos"), ("nas-fcos", "nas-fcos")] + [(f"random{i}", str(Arch.random(rng))) for i in range(args.random)]
    print("| arch | total s | train s | eval s | reward | peak MB | status |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, arch in archs:
        t = time.perf_counter()
        rec = evaluate_arch(arch, train, val, num_classes=K, cfg=cfg)
        total = time.perf_counter() - t
        print(
            f"| {name} | {total:.1f} | {rec['train_seconds']:.1f} | {rec['eval_seconds']:.1f} | {rec['reward']:.4f} | {rec['peak_mem_mb']:.0f} | {rec['status']} {rec['error']} |",
            flush=True,
        )
    if not args.no_peer:
        s = torchvision_peer(raw, setting, K, cfg.width, device)
        print(f"| torchvision FPN+FCOSHead (peer, train only) | {s:.1f} | {s:.1f} | - | - | - | ok |")


if __name__ == "__main__":
    main()
