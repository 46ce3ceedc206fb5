"""CPU: our FPN-FCOS R-50 against torchvision's ``fcos_resnet50_fpn``, inference and train step.

Prints ours/torchvision time ratios (< 1: ours is faster), measured side by side in one
process, interleaved (the order alternates every repeat), median of ``--repeats``:

    python benchmarks/cpu_inference.py                      # 2 threads, 1x3x800x1088, 10 repeats
    python benchmarks/cpu_inference.py --size 256 352 --repeats 3 --no-train   # a quick look
    python benchmarks/cpu_inference.py --profile            # + torch.profiler tables of one inference each

Inference = image normalisation + forward + post-processing, batch 1, random weights
(no downloads), ``torch.inference_mode``. Ours: ``Detector.predict`` of
``DetectorSpec(backbone="resnet50", decoder="fpn-fcos")`` on the image normalised as our
data pipeline does (``predict`` folds the frozen BatchNorms into the convs). Peer: ``fcos_resnet50_fpn(weights=None, weights_backbone=None)``
called on the raw [0, 1] image (its transform normalises and resizes, 800 -> 800 here);
without weights torchvision builds it with trainable ``nn.BatchNorm2d``, which in eval
mode is one fused kernel; ``--peer frozen`` builds it as it is with pretrained weights
(``FrozenBatchNorm2d``, 3 trainable stages, like ours). Train step = forward + loss +
backward + SGD step on one image with 3 random boxes (ours: ``nasfcos.engine.train.LossSums``
as ``train`` runs it, fp32 on CPU). Both have ``--classes`` classes (80). No prefect.
``--channels-last`` converts both models and the images to the channels_last memory format
(oneDNN then skips its per-conv layout reorders). ``--before`` also times our detector as it was before issue #15 (torchvision's
FrozenBatchNorm2d, no folding, the per-level post-processing loop), interleaved with the others, with
the same weights: its detections must equal the current ones.

ONNX Runtime column (on when onnx, onnxruntime and onnxscript import; ``--no-onnx`` skips it): our
detector, with the same weights, exported by ``nasfcos.onnx_export.export_onnx`` to a temporary
file (the export's seconds are printed once, outside the timed loop) and run by ``OnnxDetector``
(network in ONNX Runtime's CPUExecutionProvider, post-processing in torch), on the same
normalised image, timed interleaved with the others. Its session has ``intra_op_num_threads =
--threads``, ``inter_op_num_threads = 1`` and no spin-waiting (ORT's idle threads would otherwise
spin and steal CPU from the next callable). Before timing, its detections are checked against
``Detector.predict``'s (same count and labels, scores within 1e-4; random weights may give none,
so the raw level outputs are compared too).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # python benchmarks/cpu_inference.py from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from nasfcos.data.transforms import Normalize
from nasfcos.engine.train import LossSums, TrainConfig, param_groups
from nasfcos.model.detector import DetectorSpec, build_detector


def torchvision_fcos(num_classes: int, peer: str, h: int, w: int) -> torch.nn.Module:
    """``fcos_resnet50_fpn`` with random weights; ``frozen``: as built for pretrained weights.
    Its transform's min/max sizes are the image's own sides, so it never rescales."""
    from torchvision.models.detection import fcos_resnet50_fpn

    sizes = dict(min_size=min(h, w), max_size=max(h, w))
    if peer == "default":
        return fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **sizes)
    from torchvision.models import resnet50
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return FCOS(backbone, num_classes, **sizes)


def random_targets(h: int, w: int, num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
    wh = 32 + torch.rand(3, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
    return {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, num_classes, (3,), generator=g)}


class Bench:
    """The measured callables (ours, torchvision, optionally ours before #15 and ours in ONNX
    Runtime), sharing one image and one target."""

    def __init__(self, h: int, w: int, num_classes: int, peer: str, before: bool = False, channels_last: bool = False) -> None:
        torch.manual_seed(0)
        self.image = torch.rand(3, h, w)  # raw [0, 1] image
        self.target = random_targets(h, w, num_classes)
        self.normalize = Normalize()
        self.ours = build_detector(DetectorSpec(num_classes=num_classes, backbone="resnet50", decoder="fpn-fcos"))
        self.tv = torchvision_fcos(num_classes, peer, h, w)
        self.channels_last = channels_last
        if channels_last:  # torchvision's convs follow their weights' layout (its batch is built inside)
            self.ours, self.tv = self.ours.to(memory_format=torch.channels_last), self.tv.to(memory_format=torch.channels_last)
        cfg = TrainConfig(base_lr=1e-4)  # tiny lr: many steps must stay finite on random weights
        self.ours_step = LossSums(self.ours, amp=False)
        self.ours_opt = torch.optim.SGD(param_groups(self.ours, cfg), lr=cfg.base_lr, momentum=cfg.momentum)
        self.tv_opt = torch.optim.SGD([p for p in self.tv.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        self.before = _before_issue_15(self.ours) if before else None
        self.onnx = None  # an OnnxDetector of ours' weights, set by attach_onnx

    def onnx_infer(self):
        with torch.inference_mode():
            return self.onnx.predict(self._input(channels_last=False), [tuple(self.image.shape[-2:])])

    def before_infer(self):
        from gpu_suite import reference_postprocess

        self.before.eval()
        with torch.inference_mode():
            return reference_postprocess(self.before.fcos, self.before(self._input()), [tuple(self.image.shape[-2:])])

    def ours_infer(self):
        self.ours.eval()
        with torch.inference_mode():
            return self.ours.predict(self._input(), [tuple(self.image.shape[-2:])])

    def tv_infer(self):
        self.tv.eval()
        with torch.inference_mode():
            return self.tv([self.image])

    def _input(self, channels_last: bool | None = None) -> torch.Tensor:
        x = self.normalize(self.image, {})[0][None]  # (1, 3, H, W)
        channels_last = self.channels_last if channels_last is None else channels_last
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def ours_train(self):
        self.ours.train()
        sums = self.ours_step(self._input(), [self.target])
        loss = sum(self.ours.fcos.combine(sums).values())
        self.ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.ours_opt.step()

    def tv_train(self):
        self.tv.train()
        loss = sum(self.tv([self.image], [self.target]).values())
        self.tv_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.tv_opt.step()


def _before_issue_15(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with torchvision's FrozenBatchNorm2d (x * scale + bias) in place of
    our fused one (same class layout and buffers: only ``forward`` differs)."""
    import copy

    from torchvision.ops import FrozenBatchNorm2d

    before = copy.deepcopy(model)
    for m in before.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.__class__ = FrozenBatchNorm2d
    return before


def check_before(bench: Bench) -> str:
    """Detections of ours and ours-before on the same (current) weights: the train steps
    moved ours' weights since the copy, so copy again."""
    bench.before = _before_issue_15(bench.ours)
    (a,), (b,) = bench.ours_infer(), bench.before_infer()
    if len(a["scores"]) != len(b["scores"]) or not torch.equal(a["labels"], b["labels"]):
        return f"detections differ: {len(a['scores'])} vs {len(b['scores'])} (labels equal: {torch.equal(a['labels'], b['labels'])})"
    box = (a["boxes"] - b["boxes"]).abs().max().item() if len(a["scores"]) else 0.0
    score = (a["scores"] - b["scores"]).abs().max().item() if len(a["scores"]) else 0.0
    return f"detections of ours vs ours before #15: {len(a['scores'])} each, labels equal, max |d box| {box:.2e} px, max |d score| {score:.2e}"


ONNX_SCORE_TOLERANCE = 1e-4


def onnx_missing() -> str | None:
    """Why the ONNX Runtime column cannot run here, or None."""
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed (pip install 'nasfcos[export]')" if missing else None


def attach_onnx(bench: Bench, threads: int) -> str:
    """Export ours (its current weights) to a temporary file, load it as ``bench.onnx`` with a
    session of ``threads`` intra-op threads; return the line to print (export seconds, versions)."""
    import onnxruntime as ort

    from nasfcos.onnx_export import OnnxDetector, export_onnx

    bench.ours.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # keep any exporter chatter out of the results
            info = export_onnx(bench.ours, path, arch="FPN-FCOS R-50")
        seconds = time.perf_counter() - t
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # the calling thread + threads - 1 pool threads, like torch's
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-wait between calls
        detector = OnnxDetector(path, bench.ours.fcos, session_options=opts)
    bench.onnx = detector
    return (
        f"# onnx: exported in {seconds:.1f} s (opset {info['opset']}, its check max |d| {info['checked']['max_abs_diff']:.1e}), "
        f"onnxruntime {ort.__version__} CPUExecutionProvider, intra_op_num_threads={threads}, inter_op_num_threads=1, no spinning"
    )


def check_onnx(bench: Bench) -> str:
    """Detections of ours in PyTorch and in ONNX Runtime on the same weights (run before any
    train step moves ours' weights): same count and labels, scores within 1e-4; and the raw
    level outputs, since random weights may leave no detection to compare."""
    (a,), (b,) = bench.ours_infer(), bench.onnx_infer()
    with torch.inference_mode():
        x = bench._input(channels_last=False)
        raw_ours = bench.ours.decoder(bench.ours._folded_backbone()(x))
        raw_onnx = bench.onnx(x)
    raw = max((p - q).abs().max().item() for lp, lq in zip(raw_ours, raw_onnx, strict=True) for p, q in zip(lp, lq, strict=True))
    n = len(a["scores"])
    if n != len(b["scores"]) or not torch.equal(a["labels"], b["labels"]):
        return f"ONNX CHECK FAILED: detections of ours PyTorch vs ONNX Runtime differ: {n} vs {len(b['scores'])} (labels equal: {torch.equal(a['labels'], b['labels'])}), max |d raw output| {raw:.2e}"
    if n == 0:
        return f"detections of ours PyTorch vs ONNX Runtime: 0 each (random weights: nothing over the score threshold), max |d raw output| {raw:.2e}"
    box = (a["boxes"] - b["boxes"]).abs().max().item()
    score = (a["scores"] - b["scores"]).abs().max().item()
    verdict = "" if score <= ONNX_SCORE_TOLERANCE else f"ONNX CHECK FAILED (scores differ by more than {ONNX_SCORE_TOLERANCE:g}): "
    return f"{verdict}detections of ours PyTorch vs ONNX Runtime: {n} each, labels equal, max |d box| {box:.2e} px, max |d score| {score:.2e}, max |d raw output| {raw:.2e}"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(bench: Bench, *, repeats: int, warmup: int, train: bool) -> dict[str, list[float]]:
    """Seconds per call, interleaved; every other repeat runs them in reverse order."""
    infer = [("ours", bench.ours_infer), ("torchvision", bench.tv_infer)]
    infer += [("before", bench.before_infer)] if bench.before else []
    infer += [("onnx", bench.onnx_infer)] if bench.onnx else []
    pairs = [("infer", infer)]
    if train:
        pairs.append(("train", [("ours", bench.ours_train), ("torchvision", bench.tv_train)]))
    times: dict[str, list[float]] = {f"{who} {what}": [] for what, fns in pairs for who, _ in fns}
    for r in range(warmup + repeats):
        for what, order in pairs:
            for who, fn in order if r % 2 == 0 else order[::-1]:
                t = timed(fn)
                if r >= warmup:
                    times[f"{who} {what}"].append(t)
        print(f"  repeat {r + 1}/{warmup + repeats}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items() if v), file=sys.stderr, flush=True)
    return times


def profile(bench: Bench, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, fn in (("ours", bench.ours_infer), ("torchvision", bench.tv_infer)):
        fn()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n## profile: {name} inference (self CPU time, top {rows})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: %(default)s)")
    ap.add_argument("--size", type=int, nargs=2, default=(800, 1088), metavar=("H", "W"), help="image size (default: 800 1088)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls of each (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each first (default: %(default)s)")
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--peer", choices=("default", "frozen"), default="default", help="torchvision model as built without (default) or with pretrained weights (frozen)")
    ap.add_argument("--no-train", action="store_true", help="inference only")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of one inference of each")
    ap.add_argument("--channels-last", action="store_true", help="both models and images in channels_last")
    ap.add_argument("--before", action="store_true", help="also time our inference as before issue #15 (and check its detections are the same)")
    ap.add_argument(
        "--onnx",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time our detector exported to ONNX and run in ONNX Runtime (default: on when onnxruntime is installed)",
    )
    args = ap.parse_args(argv)
    missing = onnx_missing() if args.onnx is not False else None
    if missing and args.onnx:
        ap.error(f"--onnx: {missing}")
    torch.set_num_threads(args.threads)
    h, w = args.size
    bench = Bench(h, w, args.classes, args.peer, before=args.before, channels_last=args.channels_last)
    print(
        f"# cpu_inference: {platform.processor() or platform.machine()}, {args.threads} threads, 1x3x{h}x{w}, "
        f"{args.classes} classes, peer={args.peer}{', channels_last' if args.channels_last else ''}, torch {torch.__version__}, median of {args.repeats} (interleaved)",
        flush=True,
    )
    onnx_check = None
    if missing:
        print(f"# onnx: ONNX Runtime column skipped: {missing}", flush=True)
    elif args.onnx is not False:
        from nasfcos.onnx_export import OnnxExportError

        try:
            print(attach_onnx(bench, args.threads), flush=True)
        except OnnxExportError as e:
            print(f"# onnx: ONNX Runtime column skipped: {e}", flush=True)
        else:
            onnx_check = check_onnx(bench)  # now, while ours has the exported weights (train steps move them)
    times = measure(bench, repeats=args.repeats, warmup=args.warmup, train=not args.no_train)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| measure | ours ms | torchvision ms | ours/torchvision |")
    print("|---|---:|---:|---:|")
    ratios = {}
    for what in ("infer", "train"):
        if f"ours {what}" not in med:
            continue
        o, t = med[f"ours {what}"], med[f"torchvision {what}"]
        ratios[what] = o / t
        label = "inference (normalise + forward + post-processing)" if what == "infer" else "train step (fwd + loss + bwd + SGD)"
        print(f"| {label} | {o * 1e3:.0f} | {t * 1e3:.0f} | {o / t:.3f} |", flush=True)
        if what == "infer" and "before infer" in med:
            b = med["before infer"]
            ratios["before"] = b / t
            print(f"| inference, ours before #15 (torchvision FrozenBN, per-level loop) | {b * 1e3:.0f} | {t * 1e3:.0f} | {b / t:.3f} |", flush=True)
        if what == "infer" and "onnx infer" in med:
            x = med["onnx infer"]
            print(f"| inference, ours in ONNX Runtime (network in ORT, post-processing in torch) | {x * 1e3:.0f} | {t * 1e3:.0f} | {x / t:.3f} |", flush=True)
    if bench.before:
        print(check_before(bench))
    if "onnx infer" in med:
        x, o, t = med["onnx infer"], med["ours infer"], med["torchvision infer"]
        print(f"ours ONNX Runtime inference {x * 1e3:.0f} ms: {x / t:.3f} x torchvision, {x / o:.3f} x ours PyTorch")
    if onnx_check:
        print(onnx_check)
    if args.profile:
        profile(bench, rows=25)
    return ratios


if __name__ == "__main__":
    main()
