"""The proxy task: score a decoder on cached backbone features (NAS-FCOS §3.3, §4.1).

"Fast decoder adaptation": the backbone features C2..C5 of the meta-train and
meta-val images are computed once; each sampled decoder (all ops at width 64,
inputs adapted by 1x1 convs) is trained on them with Adam (lr 8e-4, batch 200,
15 epochs) and Polyak (EMA) weight averaging (decay 0.9), then evaluated with
the averaged weights. The reward is the negative validation loss

    R = -(L_cls + L_reg + L_ctr),

each term the FCOS loss over the *whole* meta-val set: the focal sum divided by
the positive points plus the images (the paper variant, ``FCOS.combine``), the
centerness sum by the positive points, the IoU sum by the total centerness weight (``FCOS.loss_sums`` accumulated over batches, then
``FCOS.combine``), so the reward does not depend on the evaluation batch size.
(The paper's R(a) is a sum of per-sample losses; this ratio of sums is the FCOS
loss of the whole set, docs/fidelity.md.) ``reward="ap"`` scores COCO AP of the
decoder's detections on meta-val instead (pycocotools): §4.4.1's ablation (Fig. 7).

Targets: FCOS's size ranges 0-64-128-256-512-inf are for an 800-pixel short side;
at the proxy's 384x384 crops every object is < 384 px, so P7 would never get a
positive. As §4.1 says ("target object sizes of interest are scaled
correspondingly"), the ranges are scaled by crop/800 (0-31-61-123-246-inf at 384)
unless a ``size_range_scale`` is given (1.0 = unscaled).

Speed: features and per-point targets live on the device, batches are index
gathers of a device-side permutation, bf16 autocast and channels_last on GPU.
With ``sync_free`` nothing reads a value back to the host until training has
finished (without it, the loss's boolean indexing of the positives and
AveragedModel's update count sync every step); ``deform_dtype`` and ``compile``
are the other speed switches of ``ProxyConfig`` (issue #15). When the
features do not fit the device (~50 GB fp16 for VOC at 384x384), a split made with
``stream=True`` keeps them in host memory: a background thread gathers the next batch
into pinned memory while the device trains on the current one, then copies it
asynchronously. Same batches in the same order: the reward is the same either way.

Letter legend: N samples, C channels, H/W map size, P points, K classes.
"""

from __future__ import annotations

import copy
import logging
import resource
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from nasfcos import cancel, rng
from nasfcos.arch import Arch, resolve
from nasfcos.errors import is_infrastructure, one_line
from nasfcos.model.backbones import LEVELS
from nasfcos.model.complexity import count_call_macs
from nasfcos.model.decoder import build_decoder
from nasfcos.model.fcos import FCOS, Assigned, LevelOutputs, Points, flatten_outputs, scaled_size_ranges
from nasfcos.model.ops import deform_dtype_error, set_deform_dtype
from nasfcos.rng import local_generator

log = logging.getLogger(__name__)

REWARDS = ("loss", "ap")

# The short side FCOS's size ranges were made for (training at 800x1333).
REFERENCE_SHORT_SIDE = 800


@dataclass(frozen=True)
class ProxyConfig:
    """Proxy-task settings; defaults are the paper's (§4.1)."""

    width: int = 64
    lr: float = 8e-4
    batch_size: int = 200
    epochs: int = 15
    ema_decay: float = 0.9
    eval_batch_size: int = 200
    loss_variant: str = "paper"
    reward: str = "loss"  # "loss": -(L_cls + L_reg + L_ctr) on meta-val (§3.3); "ap": meta-val AP (§4.4.1's ablation)
    seed: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    # Speed switches (issue #15; off by default until a GPU run says they keep the ranking):
    deform_dtype: str = "float32"  # deformable convs in float16 (nasfcos.model.ops.set_deform_dtype)
    sync_free: bool = False  # no host sync per step: dense box losses, EMA counted on the host
    compile: str = ""  # torch.compile backend of the training forward ("inductor"); "" = eager

    def __post_init__(self) -> None:
        for f in ("width", "batch_size", "eval_batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"proxy config: {f} must be >= 1, got {getattr(self, f)}")
        if self.epochs < 0:
            raise ValueError(f"proxy config: epochs must be >= 0, got {self.epochs}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"proxy config: ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.reward not in REWARDS:
            raise ValueError(f"proxy config: reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        if (why := deform_dtype_error(self.deform_dtype)) is not None:
            raise ValueError(f"proxy config: deform_dtype {why}")


@dataclass
class ProxySplit:
    """One split for training on ``device``: features (N, C, H, W) for C2..C5, on the
    device or streamed from host memory (see the module docstring), and the per-point
    FCOS targets of every sample on the device (assigned once: crops are fixed)."""

    feats: list[Tensor]
    assigned: Assigned
    points: Points
    size_ranges: tuple[tuple[float, float], ...] = ()
    device: torch.device | None = None  # None: where the features are
    stream: bool = False  # features in host memory, batches copied to ``device``
    boxes: list[Tensor] | None = None  # per sample (M, 4) x1y1x2y2 in the crop: the AP reward's ground truth
    labels: list[Tensor] | None = None  # per sample (M,) class indices

    def __post_init__(self) -> None:
        self.device = self.feats[0].device if self.device is None else torch.device(self.device)

    def __len__(self) -> int:
        return self.feats[0].shape[0]

    def batches(self, order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, list[Tensor]]]:
        """(device indices, device features) per ``batch_size`` slice of ``order``."""
        chunks = list(torch.split(order, batch_size))
        if not self.stream:
            for idx in chunks:
                yield idx, [f[idx] for f in self.feats]
            return
        host = list(torch.split(order.cpu(), batch_size))  # one sync per pass
        pin = self.device.type == "cuda"

        def gather(idx: Tensor) -> list[Tensor]:  # index_select releases the GIL
            return [torch.index_select(f, 0, idx, out=torch.empty((len(idx), *f.shape[1:]), dtype=f.dtype, pin_memory=pin)) for f in self.feats]

        with ThreadPoolExecutor(1, thread_name_prefix="proxy-stream") as pool:
            nxt = pool.submit(gather, host[0]) if host else None
            for i, idx in enumerate(chunks):
                feats = nxt.result()
                nxt = pool.submit(gather, host[i + 1]) if i + 1 < len(host) else None
                # pinned blocks are reused only after their copy finished (torch's host allocator)
                yield idx, [f.to(self.device, non_blocking=True) for f in feats]


def prepare_split(
    feats: dict[str, Tensor],
    boxes: list[Tensor],
    labels: list[Tensor],
    *,
    num_classes: int,
    device: str | torch.device = "cpu",
    loss_variant: str = "paper",
    size_range_scale: float | None = None,
    stream: bool = False,
) -> ProxySplit:
    """Move a split to ``device`` and assign FCOS targets to its points once.

    ``feats`` maps C2..C5 to (N, C, H, W) arrays (fp16 from the feature store);
    ``boxes[i]`` (M, 4) x1y1x2y2 and ``labels[i]`` (M,) are sample i's targets
    in the cropped frame. ``size_range_scale`` multiplies FCOS's size ranges;
    None scales them by input short side / 800 (the input side is 4x C2's).
    ``stream`` keeps the features in host memory (for features that do not fit the device).
    """
    missing = [k for k in LEVELS if k not in feats]
    if missing:
        raise ValueError(f"proxy: features lack levels {missing} (decoders read C2..C5)")
    device = torch.device(device)
    maps = [torch.as_tensor(feats[k]) for k in LEVELS]
    maps = [m.contiguous() if stream else m.to(device) for m in maps]
    n = maps[0].shape[0]
    if any(m.shape[0] != n for m in maps) or len(boxes) != n or len(labels) != n:
        raise ValueError(f"proxy: {n} samples in C2 but levels/boxes/labels disagree")
    if size_range_scale is None:
        size_range_scale = 4 * min(maps[0].shape[-2:]) / REFERENCE_SHORT_SIDE
    fcos = FCOS(num_classes=num_classes, variant=loss_variant, size_ranges=scaled_size_ranges(scale=size_range_scale))
    points = fcos.points(_pyramid_shapes(maps), device)
    targets = [{"boxes": torch.as_tensor(b, dtype=torch.float32), "labels": torch.as_tensor(lab, dtype=torch.long)} for b, lab in zip(boxes, labels, strict=True)]
    chunks = [fcos.assign(points, [{k: v.to(device) for k, v in t.items()} for t in targets[i : i + 256]]) for i in range(0, n, 256)]
    assigned = Assigned(
        labels=torch.cat([c.labels for c in chunks]).to(torch.int16) if chunks else torch.zeros(0, len(points.xy), dtype=torch.int16, device=device),
        ltrb=torch.cat([c.ltrb for c in chunks]) if chunks else torch.zeros(0, len(points.xy), 4, device=device),
    )
    return ProxySplit(
        feats=maps, assigned=assigned, points=points, size_ranges=fcos.size_ranges, device=device, stream=stream,
        boxes=[t["boxes"] for t in targets], labels=[t["labels"] for t in targets],
    )  # fmt: skip


# Share of the device's free memory the resident features may take; the rest is
# left to the decoders training on them (activations of a batch of 200 per slot).
RESIDENT_SHARE = 0.7


def stream_features(nbytes: int, device: str | torch.device, residency: str = "auto") -> bool:
    """Whether proxy features of ``nbytes`` should stay in host memory for ``device``:
    ``host`` always, ``device`` never, ``auto`` when they exceed ``RESIDENT_SHARE`` of
    the device's free memory (CUDA only: on CPU host memory is the device's)."""
    if residency not in ("auto", "device", "host"):
        raise ValueError(f"feature residency must be auto, device or host, got {residency!r}")
    device = torch.device(device)
    if residency != "auto" or device.type != "cuda":
        return residency == "host"
    free, total = torch.cuda.mem_get_info(device)
    stream = nbytes > RESIDENT_SHARE * free
    log.info(
        "proxy features %.1f GB, %s has %.1f of %.1f GB free: %s",
        nbytes / 1e9, device, free / 1e9, total / 1e9, "streamed from pinned host memory" if stream else "resident on the device",
    )  # fmt: skip
    return stream


def _pyramid_shapes(maps: list[Tensor]) -> list[tuple[int, int]]:
    """P3..P7 sizes: P3-P5 at the C3-C5 resolutions, P6/P7 by stride-2 3x3 convs."""
    shapes = [tuple(m.shape[-2:]) for m in maps[1:]]
    for _ in range(2):
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


class ProxyModel(nn.Module):
    """Decoder + FCOS (whose per-level scales are trained too)."""

    def __init__(self, arch: Arch, *, in_channels: tuple[int, ...], num_classes: int, cfg: ProxyConfig) -> None:
        super().__init__()
        self.decoder = build_decoder(arch, in_channels=tuple(in_channels), num_classes=num_classes, width=cfg.width)
        self.fcos = FCOS(num_classes=num_classes, variant=cfg.loss_variant, sync_free=cfg.sync_free)
        set_deform_dtype(self.decoder, cfg.deform_dtype)

    def forward(self, feats: list[Tensor]) -> LevelOutputs:
        return self.decoder(feats)


def _forward(model, feats: list[Tensor], autocast: bool):
    """The decoder's outputs for one batch of cached features (fp16 on disk: bf16 autocast,
    or fp32)."""
    with torch.autocast(device_type=feats[0].device.type, dtype=torch.bfloat16, enabled=autocast):
        return model([f.float() if not autocast else f for f in feats])


def _batch_sums(model: ProxyModel, split: ProxySplit, idx: Tensor, feats: list[Tensor], autocast: bool, forward=None) -> dict[str, Tensor]:
    """FCOS loss sums of one batch; ``forward`` replaces ``model``'s (a compiled one)."""
    cls, reg, ctr = flatten_outputs(_forward(model if forward is None else forward, feats, autocast))
    assigned = Assigned(split.assigned.labels[idx].long(), split.assigned.ltrb[idx])
    return model.fcos.loss_sums(cls, reg, ctr, split.points, assigned)


@torch.no_grad()
def validation_losses(model: ProxyModel, split: ProxySplit, *, batch_size: int, autocast: bool) -> dict[str, Tensor]:
    """L_cls, L_reg, L_ctr over the whole split (sums accumulated, normalised once)."""
    model.eval()
    total: dict[str, Tensor] = {}
    for idx, feats in split.batches(torch.arange(len(split), device=split.device), batch_size):
        for k, v in _batch_sums(model, split, idx, feats, autocast).items():
            total[k] = total.get(k, 0) + v.detach().float()
    return FCOS.combine(total)


@torch.no_grad()
def validation_ap(model: ProxyModel, split: ProxySplit, *, batch_size: int, autocast: bool) -> dict[str, float]:
    """COCO AP, AP50, ... of the decoder's detections on the whole split (pycocotools),
    each sample an image of the input size (4x C2's map) with its crop's boxes as ground truth."""
    from nasfcos.evaluation.coco import coco_evaluate, to_coco_results  # pycocotools: only the AP reward needs it (the GPU suite runs without)

    if split.boxes is None or split.labels is None:
        raise ValueError("proxy: the AP reward needs the split's boxes and labels (prepare_split keeps them)")
    model.eval()
    h, w = (4 * s for s in split.feats[0].shape[-2:])
    categories = list(range(1, model.fcos.num_classes + 1))
    gt = {"images": [{"id": i, "height": h, "width": w} for i in range(len(split))], "categories": [{"id": c} for c in categories], "annotations": []}
    for i, (boxes, labels) in enumerate(zip(split.boxes, split.labels, strict=True)):
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist(), strict=True):
            gt["annotations"].append({"image_id": i, "category_id": categories[label], "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    results = []
    for idx, feats in split.batches(torch.arange(len(split), device=split.device), batch_size):
        outs = _forward(model, feats, autocast)
        detections = model.fcos.postprocess([tuple(t.float() for t in level) for level in outs], [(h, w)] * len(idx))
        for i, d in zip(idx.tolist(), detections, strict=True):
            results += to_coco_results(i, d["boxes"], d["scores"], d["labels"], categories)
    return coco_evaluate(gt, results)


class EMA(nn.Module):
    """Polyak averaging as ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
    use_buffers=True)`` computes it (the same ops), with the update count kept on the host:
    AveragedModel copies its count to the device on every update, a host sync per step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()], strict=True))
        if self.updates == 0:
            for e, c in pairs:
                e.copy_(c)
        else:
            floats = [(e, c) for e, c in pairs if e.is_floating_point()]
            if floats:
                torch._foreach_lerp_([e for e, _ in floats], [c for _, c in floats], 1 - self.decay)
            for e, c in pairs:
                if not e.is_floating_point():  # e.g. BatchNorm's num_batches_tracked, as get_ema_multi_avg_fn does
                    e.copy_(e * self.decay + c * (1 - self.decay))
        self.updates += 1


def train_proxy(model: ProxyModel, split: ProxySplit, cfg: ProxyConfig, *, resume: dict | None = None, keep: Callable[[dict], None] | None = None) -> nn.Module:
    """Adam + EMA over ``cfg.epochs`` epochs; returns the averaged model (its ``.module``).

    Successive halving (``nasfcos.search.halving``): ``resume`` is the state ``keep`` was given
    by an earlier call for the same arch and seed at fewer epochs (weights, EMA, Adam,
    data-order generator); training goes on from its epoch to ``cfg.epochs`` and ends
    with the weights of training ``cfg.epochs`` at once. ``keep`` receives the state after
    training."""
    device = split.device
    autocast = cfg.amp and device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.sync_free:
        ema: nn.Module = EMA(model, cfg.ema_decay)
    else:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    # compiled forward for training only: the EMA copy and the state dict stay plain modules
    forward = torch.compile(model, backend=cfg.compile, dynamic=False) if cfg.compile else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        if resume["ema_updates"] is not None:
            ema.updates = resume["ema_updates"]
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        start = resume["epochs"]
        if start > cfg.epochs:
            raise ValueError(f"proxy: cannot resume a state of {start} epochs to train {cfg.epochs}")
    model.train()
    n = len(split)
    for _ in range(start, cfg.epochs):
        perm = torch.randperm(n, generator=gen, device=device)
        for idx, feats in split.batches(perm, cfg.batch_size):
            cancel.check()  # a stopped search frees this slot within a batch
            sums = _batch_sums(model, split, idx, feats, autocast, forward)
            loss = sum(FCOS.combine(sums).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update_parameters(model)
    if keep is not None:
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict()}
        keep({**state, "ema_updates": getattr(ema, "updates", None), "generator": gen.get_state(), "epochs": cfg.epochs})
    return ema


def evaluate_arch(
    arch: Arch | str,
    train: ProxySplit,
    val: ProxySplit,
    *,
    num_classes: int,
    cfg: ProxyConfig = ProxyConfig(),
    device_shared: bool = False,
    resume: dict | None = None,
    keep_state: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``arch`` on ``train`` and return its record (reward, losses, cost, status).

    ``resume`` / ``keep_state``: successive halving's training state, as ``train_proxy``'s
    ``resume`` / ``keep``; the record's ``epochs`` is ``cfg.epochs`` either way.

    Never raises for a bad architecture: NaN/inf losses, out-of-memory alone on the
    device and any other arch failure give ``status='failed'`` with the error text,
    so one broken decoder cannot kill a search. Infrastructure failures
    (``nasfcos.errors``: device errors, out-of-memory on a device shared with other
    evaluations (``device_shared``), I/O errors) are raised, to be retried.
    """
    device = train.device
    arch = resolve(arch)
    record = {
        "arch_id": arch.arch_id,
        "arch": str(arch),
        "reward": float("nan"),
        "loss_cls": float("nan"),
        "loss_reg": float("nan"),
        "loss_ctr": float("nan"),
        "params": -1,
        "macs": -1,
        "train_seconds": 0.0,
        "eval_seconds": 0.0,
        "peak_mem_mb": 0.0,
        "device": _device_name(device),
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "status": "failed",
        "error": "",
        "started_at": datetime.now(timezone.utc),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        in_channels = tuple(f.shape[1] for f in train.feats)
        with local_generator(rng.generator(cfg.seed)):  # the same arch and seed give the same weights, whatever runs beside it
            model = ProxyModel(arch, in_channels=in_channels, num_classes=num_classes, cfg=cfg)
        model = model.to(device)
        if cfg.channels_last and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        record["params"] = sum(p.numel() for p in model.decoder.parameters())
        with torch.no_grad():  # MACs of the decoder on one sample at the proxy geometry
            record["macs"] = count_call_macs(model.decoder.eval(), [f[:1].to(device).float() for f in train.feats])
        t0 = _now(device)
        ema = train_proxy(model, train, cfg, resume=resume, keep=keep_state)
        t1 = _now(device)
        losses = validation_losses(ema.module, val, batch_size=cfg.eval_batch_size, autocast=cfg.amp and device.type == "cuda")
        values = {k: float(v) for k, v in losses.items()}  # the one host sync
        record.update({f"loss_{k}": v for k, v in values.items()})
        total = sum(values.values())
        if not torch.isfinite(torch.tensor(total)):
            raise FloatingPointError("non-finite validation loss: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
        reward = -total
        if cfg.reward == "ap":  # the losses stay in the record: both rewards of one arch side by side
            reward = validation_ap(ema.module, val, batch_size=cfg.eval_batch_size, autocast=cfg.amp and device.type == "cuda")["AP"]
        t2 = _now(device)
        record.update(train_seconds=t1 - t0, eval_seconds=t2 - t1, reward=reward, status="ok")
    except Exception as e:  # noqa: BLE001 - recorded, see docstring
        if isinstance(e, torch.OutOfMemoryError) and device.type == "cuda":
            torch.cuda.empty_cache()
        if is_infrastructure(e, device_shared=device_shared):
            raise
        record["error"] = one_line(e)
        log.warning("proxy evaluation of %s failed: %s", arch.arch_id, record["error"], exc_info=True)
    record["peak_mem_mb"] = _peak_mem_mb(device)
    record["finished_at"] = datetime.now(timezone.utc)
    return record


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device}:{torch.cuda.get_device_name(device)}"
    return str(device)


def _peak_mem_mb(device: torch.device) -> float:
    """Peak device memory on CUDA; on CPU the process's peak resident set (whole process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
