"""Full detector training: backbone finetuning on VOC (NAS-FCOS §4.1) and full
training of the selected decoders on COCO (§4.2).

SGD with linear warm-up and step decay, AMP on GPU, optional gradient
clipping, and checkpoints (model, optimizer, scheduler, AMP scaler, RNG states,
iteration) written atomically every N iterations. A killed run resumes exactly:
the order of samples and each sample's augmentation are functions of
(seed, sample position), not of loader state, so iteration i sees the same
batch whether or not the run was interrupted before it.

The same loop runs as one rank of data-parallel training (``rank``/``world_size``;
``nasfcos.engine.distributed`` starts the processes and says what stays equal to one process).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from nasfcos import rng
from nasfcos.data.transforms import collate
from nasfcos.engine.checkpoint import CHECKPOINT, load_checkpoint, remove_orphans, save_checkpoint
from nasfcos.engine.curves import Curves
from nasfcos.engine.sampling import PositionSampler, SeededSamples
from nasfcos.fault_injection import fault_point
from nasfcos.model.detector import Detector, DetectorSpec, build_detector
from nasfcos.progress import Progress, fmt_eta
from nasfcos.rng import local_generator

log = logging.getLogger(__name__)

# Fields that may change when a run is resumed (they do not change what was computed).
_RESUMABLE_FIELDS = ("iterations", "checkpoint_every", "log_every", "num_workers", "channels_last", "sync_free")
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults are the paper's COCO schedule (§4.2,
    FCOS 1x): batch 16, 90K iterations, lr 0.01 divided by 10 at 60K and 80K,
    with the NAS-FCOS reference code's warm-up (maskrcnn-benchmark's default:
    500 its rising *linearly* from lr/3; FCOS's own configs hold a constant lr/3
    instead), momentum 0.9, weight decay 1e-4, doubled bias lr and no bias decay."""

    iterations: int = 90_000
    batch_size: int = 16
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_factor: float = 2.0
    bias_weight_decay: float = 0.0
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3
    steps: tuple[int, ...] = (60_000, 80_000)
    gamma: float = 0.1
    clip_grad_norm: float = 0.0  # 0 = off (the FCOS reference code does not clip)
    amp: bool = True  # fp16 autocast + GradScaler; only on CUDA
    min_size: tuple[int, ...] = (800,)  # short side; several values = multi-scale training
    max_size: int = 1333
    crop: int = 0  # square random crop after resize; 0 = none
    flip: bool = True
    checkpoint_every: int = 1500  # 1.7 % of the 90K iterations: what a kill loses at most
    log_every: int = 20
    seed: int = 0
    num_workers: int = 4
    # Speed switches (issue #15), off by default: bfloat16 autocast needs no GradScaler (whose
    # step reads its inf check back to the host every iteration); channels_last memory
    # format; sync_free: dense box losses, pinned targets copied without waiting, the
    # non-finite-loss check made at log/checkpoint iterations (naming the first bad one).
    amp_dtype: str = "float16"
    channels_last: bool = False
    sync_free: bool = False

    def __post_init__(self) -> None:
        for f in ("iterations", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, f) < 1:
                raise ValueError(f"train config: {f} must be >= 1, got {getattr(self, f)}")
        if self.base_lr <= 0:
            raise ValueError(f"train config: base_lr must be > 0, got {self.base_lr}")
        if list(self.steps) != sorted(self.steps):
            raise ValueError(f"train config: steps must be increasing, got {self.steps}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"train config: amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {self.amp_dtype!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"train config: unknown field(s) {sorted(unknown)}")
        d = dict(d)
        for k in ("steps", "min_size"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


# The paper's two schedules; anything else is a TrainConfig built by the caller.
SCHEDULES = {
    # §4.2: COCO, batch 16, 90K its, lr 0.01, /10 at 60K and 80K, short side 800 / max 1333;
    # linear warm-up over 500 its from lr/3 (the NAS-FCOS code's, see TrainConfig).
    "coco-1x": TrainConfig(),
    # §4.1: backbone finetuning on VOC: 1330x800 input, crop 800x800, batch 24, 30K its,
    # lr 0.01, /10 at 18K and 24K; the same linear warm-up (the paper does not say another).
    "voc-finetune": TrainConfig(iterations=30_000, batch_size=24, steps=(18_000, 24_000), crop=800),
}


def lr_factor(it: int, cfg: TrainConfig) -> float:
    """Multiplier of base_lr for update ``it`` (0-based): linear warm-up times step decay.

    This is maskrcnn-benchmark's WarmupMultiStepLR (method "linear") at
    ``last_epoch == it``, which is what the reference's update ``it`` uses (its
    loop steps the scheduler before the update, from last_epoch -1 under the
    PyTorch 1.0 it was written for); so the first update at lr/10 is the one
    with 0-based index ``steps[0]``.
    """
    warm = 1.0
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    return warm * cfg.gamma ** bisect.bisect_right(cfg.steps, it)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters; biases get bias_lr_factor x lr and bias_weight_decay."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith(".bias") else weights).append(p)
    return [
        {"params": weights, "lr": cfg.base_lr, "weight_decay": cfg.weight_decay},
        {"params": biases, "lr": cfg.base_lr * cfg.bias_lr_factor, "weight_decay": cfg.bias_weight_decay},
    ]


_DEFAULTS = asdict(TrainConfig())


class LossSums(nn.Module):
    """Detector forward + FCOS loss sums as one module: what data-parallel training wraps.

    DDP must see every trainable parameter used in its forward: the FCOS scales act
    after the decoder. A searched FPN may leave a parameter unused (the C2 adapter when
    no cell reads C2); DDP's ``static_graph`` learns that set in the first iteration,
    without ``find_unused_parameters``' graph walk every iteration. AMP covers the
    detector only; losses are fp32.
    """

    def __init__(self, model: Detector, *, amp: bool, amp_dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.model, self.amp, self.amp_dtype = model, amp, amp_dtype

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        with torch.autocast(device_type=images.device.type, dtype=self.amp_dtype, enabled=self.amp):
            outputs = self.model(images)
        return self.model.fcos.level_loss_sums([tuple(o.float() for o in lvl) for lvl in outputs], targets)


NORMALISERS = ("num_pos", "cls_norm", "reg_norm")


def global_normalisers(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sums`` with FCOS's normalisers summed over all ranks (number of positives,
    num_pos + images, centerness-weight sum), so that each rank's ``combine`` is its
    share of the one-process loss, whatever the number of ranks. FCOS's later code reduces
    them across GPUs the same way (``reduce_sum``); the NAS-FCOS code has no all-reduce and
    normalises per GPU (docs/fidelity.md)."""
    norms = torch.stack([sums[k].detach().float() for k in NORMALISERS])
    dist.all_reduce(norms)
    return {**sums, **dict(zip(NORMALISERS, norms.unbind(), strict=True))}


def _summed_over_ranks(parts: dict[str, Tensor], world_size: int) -> dict[str, Tensor]:
    """The loss terms of the whole global batch (detached), identical on every rank."""
    values = torch.stack([v.detach() for v in parts.values()])
    if world_size > 1:
        dist.all_reduce(values)
    return dict(zip(parts, values.unbind(), strict=True))


@dataclass
class TrainResult:
    checkpoint: Path
    iteration: int
    seconds: float
    last_losses: dict[str, float] = field(default_factory=dict)


def train(
    spec: DetectorSpec,
    dataset: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    backbone_weights: str | Path | None = None,
    init_checkpoint: str | Path | None = None,
    init_prefix: str = "",
    meta: dict | None = None,
    stop_at: int | None = None,
    fence: Callable[[int], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> TrainResult:
    """Train ``spec`` on ``dataset`` (which applies train transforms) into ``out_dir``.

    Resumes from ``out_dir/checkpoint.pt`` when it exists. ``init_checkpoint``
    initialises the weights of a fresh run from another nasfcos checkpoint
    (e.g. the VOC-finetuned backbone); keys that do not match in shape (the
    class logits of a different dataset) are skipped and logged; with ``init_prefix``
    (e.g. ``"backbone."``) only the tensors whose names start with it. ``meta`` is
    stored in the checkpoint (classes, category ids, input sizes). ``stop_at``
    ends the run early after that iteration, as if killed there (tests). ``fence(it)``
    is called by rank 0 before it starts, at each log line and before each checkpoint: it
    raises to stop a process that no longer owns ``out_dir`` (a job replaced by another).
    ``backbone_weights`` is a local file or a torchvision weight name (see
    ``nasfcos.model.weights.load_backbone_weights``), read by a fresh run only: a
    resumed run takes every weight from its checkpoint.

    ``rank``/``world_size`` > 1: this process is one rank of data-parallel training
    in an initialised process group (started by ``nasfcos.engine.distributed``); it trains
    on its share of each global batch of ``cfg.batch_size`` and only rank 0 writes.
    """
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    device = torch.device(device)
    use_amp = cfg.amp and device.type == "cuda"
    if world_size > 1 and not dist.is_initialized():
        raise RuntimeError(f"rank {rank} of {world_size}: no process group; start through nasfcos.engine.distributed")
    is_main = rank == 0

    with local_generator(rng.generator(cfg.seed)):  # the init stream: the same weights whatever runs beside it
        # a resumed run needs neither the weights file nor the network to fetch a named one
        fresh_weights = None if ckpt_path.exists() else backbone_weights
        model = build_detector(spec, backbone_weights=fresh_weights)
    if world_size > 1 and device.type == "cuda":
        # batch statistics over the global batch; torch's SyncBatchNorm refuses CPU
        # tensors, so gloo ranks on CPU (tests) keep per-rank BatchNorm
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.fcos.sync_free = cfg.sync_free
    optimizer = torch.optim.SGD(param_groups(model, cfg), lr=cfg.base_lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
    # bf16 has fp32's range: no loss scaling
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.amp_dtype == "float16")

    start = 0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["spec"] != spec.to_dict():
            raise ValueError(f"{ckpt_path}: checkpoint is for {ckpt['spec']}, not {spec.to_dict()}; use another out dir")
        old = {k: v for k, v in ckpt["train_config"].items() if k not in _RESUMABLE_FIELDS}
        new = {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_FIELDS}
        # a field missing from an older checkpoint had its default's behaviour
        changed = sorted(k for k in new if old.get(k, _DEFAULTS[k]) != new[k])
        if changed:
            raise ValueError(f"{ckpt_path}: checkpoint was trained with other settings ({', '.join(changed)}); use another out dir")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _load_scaler_state(scaler, ckpt["scaler"])
        start = int(ckpt["iteration"])
        log.info("resuming %s at iteration %d/%d", ckpt_path, start, cfg.iterations)
    elif init_checkpoint is not None:
        state = load_checkpoint(init_checkpoint)["model"]
        _init_from(model, {k: v for k, v in state.items() if k.startswith(init_prefix)}, init_checkpoint)

    step: nn.Module = LossSums(model, amp=use_amp, amp_dtype=AMP_DTYPES[cfg.amp_dtype])
    if world_size > 1:  # after loading: every rank starts from the same weights
        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)

    def save(it: int, losses: dict[str, float]) -> None:
        if not is_main:
            return
        if fence is not None:
            fence(it)
        save_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "iteration": it,
                "spec": spec.to_dict(),
                "train_config": asdict(cfg),
                "meta": meta or {},
                "losses": losses,
                "world_size": world_size,  # processes that wrote it (provenance; any N resumes)
            },
            ckpt_path,
        )
        fault_point("train:checkpointed")

    if is_main:
        if fence is not None:
            fence(start)
        remove_orphans(ckpt_path)
    end = cfg.iterations if stop_at is None else min(stop_at, cfg.iterations)
    sampler = PositionSampler(len(dataset), batch_size=cfg.batch_size, start=start, end=end, seed=cfg.seed, rank=rank, world_size=world_size)
    loader = DataLoader(
        SeededSamples(dataset),
        batch_sampler=sampler,
        generator=rng.generator(cfg.seed, "loader"),  # its worker base seed, else a draw from the global generator
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    model.train()
    t0 = tick = time.perf_counter()
    losses: dict[str, float] = {}
    it = start
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # sync_free: first non-finite iteration, 0 = none
    # a bar on a terminal; elsewhere the log lines below are the progress
    with (
        Progress(cfg.iterations, "train", initial=start, log_lines=False, terminal=None if is_main else False) as bar,
        Curves(out_dir, start=start, enabled=is_main) as curves,  # <out>/tb/: tensorboard --logdir
    ):
        for it, (images, targets) in enumerate(loader, start=start + 1):
            fault_point(f"train:{out_dir.name}:{it}:rank{rank}")  # tests: a rank killed or out of memory there
            images = images.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = [{k: v.to(device, non_blocking=cfg.sync_free) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            sums = step(images, targets)
            parts = model.fcos.combine(global_normalisers(sums) if world_size > 1 else sums)
            # this rank's share of the global-batch loss; x N because DDP averages the gradients
            loss = sum(parts.values()) * world_size
            parts = _summed_over_ranks(parts, world_size)  # the same on every rank: all raise together
            if cfg.sync_free:  # remember the first bad iteration on the device; raised below
                first_bad = torch.where(torch.isfinite(sum(parts.values())) | (first_bad > 0), first_bad, it)
                if it % cfg.log_every == 0 or it % cfg.checkpoint_every == 0 or it == end:
                    _raise_if_non_finite(int(first_bad), it)
            elif not torch.isfinite(sum(parts.values())):
                raise FloatingPointError(f"non-finite loss at iteration {it}: " + ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items()))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]  # this update's lr, logged (the step below sets the next one's)
            scheduler.step()

            if it % cfg.log_every == 0 or it == end:
                if fence is not None and is_main:  # a replaced job stops within log_every iterations, not a checkpoint interval
                    fence(it)
                losses = {k: v.item() for k, v in parts.items()}
                now = time.perf_counter()
                per_it = (now - tick) / min(cfg.log_every, it - start)
                tick = now
                eta = per_it * (cfg.iterations - it)
                (log.info if is_main else log.debug)(
                    "iter %d/%d  loss %.4f (%s)  lr %.5f  %.3f s/it  eta %s",
                    it, cfg.iterations, sum(losses.values()),
                    " ".join(f"{k} {v:.4f}" for k, v in losses.items()),
                    lr, per_it, fmt_eta(eta),
                )  # fmt: skip
                curves.add(it, {**{f"loss/{k}": v for k, v in losses.items()}, "loss/total": sum(losses.values()), "lr": lr, "images_per_s": cfg.batch_size / per_it})
            bar.update(1, **({"loss": sum(losses.values())} if it % cfg.log_every == 0 and losses else {}))
            if it % cfg.checkpoint_every == 0 or it == end:
                save(it, {k: v.item() for k, v in parts.items()})
                curves.flush()  # the curve reaches at least the checkpoint a resume starts from
    if it == start and not ckpt_path.exists():  # nothing to train (iterations already done)
        save(it, losses)
    return TrainResult(checkpoint=ckpt_path, iteration=it, seconds=time.perf_counter() - t0, last_losses=losses)


def _raise_if_non_finite(first_bad: int, it: int) -> None:
    """sync_free's deferred check: before any log line or checkpoint, so a run that
    diverged raises without saving the weights the bad iterations updated."""
    if first_bad:
        raise FloatingPointError(f"non-finite loss at iteration {first_bad} (sync_free: noticed at iteration {it})")


def _load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> None:
    """Restore the AMP loss scale only where both runs used AMP. A run started
    without it (CPU) saved ``{}``, which an enabled scaler refuses: it keeps its
    fresh initial scale instead. A disabled scaler ignores any saved state."""
    if not scaler.is_enabled():
        return
    if not state:
        log.info("checkpoint has no AMP scaler state (started without AMP): fresh loss scale")
        return
    scaler.load_state_dict(state)


def _init_from(model: nn.Module, state: dict, source: str | Path) -> None:
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    model.load_state_dict(usable, strict=False)
    log.info("initialised %d tensors from %s (skipped %d: %s)", len(usable), source, len(skipped), ", ".join(skipped[:5]))
