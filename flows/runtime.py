"""What every stage flow shares: config + run dir, stage hashes and skipping, task runners, device slots."""

from __future__ import annotations

import queue
import re
import threading
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

from prefect import get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import PipelineConfig, load_config
from storage.runs import RunDir, config_hash

# Which config sections each stage depends on; a stage's hash also covers its upstream stage.
_STAGE_SECTIONS = {
    "finetune-backbone": ("data", "finetune"),
    "materialise-features": ("features",),
    "search": ("proxy", "search"),
    "select-top-k": ("select",),
    "train-full": ("train_full",),
    "evaluate": ("evaluate",),
}
_UPSTREAM = {
    "materialise-features": "finetune-backbone",
    "search": "materialise-features",
    "select-top-k": "search",
    "train-full": "select-top-k",
    "evaluate": "train-full",
}


# Fields a finished stage may be re-run with while keeping its durable files: a larger
# search budget extends the same search.
_EXTENDABLE = {"search": {"total_archs"}}


def _sections(cfg: PipelineConfig, stage: str, *, extendable: bool) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for s in _STAGE_SECTIONS[stage]:
        d = getattr(cfg, s).model_dump(mode="json")
        if not extendable:
            d = {k: v for k, v in d.items() if k not in _EXTENDABLE.get(s, set())}
        parts[s] = d
    return parts


def conflict_key(cfg: PipelineConfig, stage: str) -> str:
    """What the durable files of ``stage`` depend on: its sections (minus extendable
    fields) and its upstream stages'. A run dir must not mix two of these."""
    parts = _sections(cfg, stage, extendable=False)
    if stage in _UPSTREAM:
        parts["upstream"] = conflict_key(cfg, _UPSTREAM[stage])
    return config_hash(parts)


def stage_hash(cfg: PipelineConfig, stage: str) -> str:
    """Hash of the config sections that determine ``stage``'s outputs (and those of its upstream stages)."""
    parts = _sections(cfg, stage, extendable=True)
    if stage in _UPSTREAM:
        parts["upstream"] = stage_hash(cfg, _UPSTREAM[stage])
    return config_hash(parts)


def run_name(stage: str):
    """flow_run_name callable: '<run_id> · <stage>'."""

    def name() -> str:
        config = (flow_run.parameters or {}).get("config")
        run_id = config.get("run_id", "?") if isinstance(config, dict) else config
        return f"{run_id} · {stage}"

    return name


def artifact_key(cfg: PipelineConfig, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{cfg.run_id}-{what}".lower())


def open_stage(config: dict | str, stage: str) -> tuple[PipelineConfig, RunDir, str, bool]:
    """Validate the config (a dict, or a preset name / YAML path for per-stage
    deployments), open the run dir and tell whether ``stage`` is already done."""
    cfg = load_config(config) if isinstance(config, str) else PipelineConfig.model_validate(config)
    run = RunDir.at(cfg.runs_dir, cfg.run_id)
    h = stage_hash(cfg, stage)
    done = run.is_done(stage, h)
    if done:
        get_run_logger().info("%s: manifest %s matches config hash %s, skipping", stage, run.manifest_path(stage), h)
    else:
        run.claim(stage, conflict_key(cfg, stage))
    return cfg, run, h, done


def portable(cfg: PipelineConfig) -> dict:
    """The config as task parameters: JSON, with ``runs_dir`` absolute, so tasks in other
    processes or machines (Dask) find the same run directory."""
    c = cfg.model_dump(mode="json")
    c["runs_dir"] = str(Path(cfg.runs_dir).resolve())
    return c


def task_runner(cfg: PipelineConfig):
    """Thread pool with one worker per device slot, or prefect-dask's DaskTaskRunner."""
    ex = cfg.execution
    if ex.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if ex.dask_address:
            return DaskTaskRunner(address=ex.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": ex.dask_workers, "threads_per_worker": 1, "processes": True})
    return ThreadPoolTaskRunner(max_workers=len(ex.devices))


_SLOTS: dict[tuple[str, ...], queue.Queue] = {}
_SLOTS_LOCK = threading.Lock()


@contextmanager
def device_slot(devices: tuple[str, ...]) -> Iterator[str]:
    """Borrow a free device from this process's pool of ``devices`` (one evaluation per slot).

    With the thread runner (as many workers as slots) a slot is always free when a
    task starts; Dask workers are separate processes, each with its own pool.
    """
    with _SLOTS_LOCK:
        if devices not in _SLOTS:
            q: queue.Queue = queue.Queue()
            for d in devices:
                q.put(d)
            _SLOTS[devices] = q
    q = _SLOTS[devices]
    device = q.get()
    try:
        yield device
    finally:
        q.put(device)


def train_config(section: Any):
    """A ``nasfcos.train.TrainConfig`` from the ``finetune`` or ``train_full`` config section."""
    from nasfcos.train import TrainConfig

    return TrainConfig(
        iterations=section.iterations, batch_size=section.batch_size, base_lr=section.lr, steps=section.steps,
        warmup_iters=section.warmup, min_size=section.min_size, max_size=section.max_size,
        crop=getattr(section, "crop", 0), clip_grad_norm=section.clip_grad,
        checkpoint_every=section.checkpoint_every, num_workers=section.num_workers,
    )  # fmt: skip


def ensure_data(cfg: PipelineConfig, run: RunDir) -> None:
    """Generate the synthetic dataset into the run dir once (deterministic; a half-written
    tree is simply regenerated, the files being the same)."""
    if cfg.data.kind != "synthetic" or (run.data / "annotations" / "instances_val.json").exists():
        return
    from nasfcos.data import make_synthetic

    d = cfg.data
    make_synthetic(run.data, num_train=d.synthetic_num_train, num_val=d.synthetic_num_val, seed=d.synthetic_seed)


def voc_dataset(cfg: PipelineConfig, run: RunDir, transforms):
    """The VOC-layout training set of backbone finetuning and the proxy task."""
    from nasfcos.data import SHAPES, VOCDetection

    if cfg.data.kind == "synthetic":
        return VOCDetection(run.data / "VOCdevkit" / "VOC2012", image_set="train", classes=SHAPES, transforms=transforms)
    if not cfg.data.voc_root:
        raise ValueError("config: data.voc_root is required when data.kind is 'voc'")
    return VOCDetection(cfg.data.voc_root, image_set=cfg.data.voc_split, transforms=transforms)


def coco_split(cfg: PipelineConfig, run: RunDir, split: str) -> tuple[str, str] | None:
    """(annotation json, image root) of the COCO ``train``/``val``/``testdev`` split, or None."""
    if cfg.data.kind == "synthetic":
        if split == "testdev":
            return None
        return str(run.data / "annotations" / f"instances_{split}.json"), str(run.data / "VOCdevkit" / "VOC2012" / "JPEGImages")
    ann, images = getattr(cfg.data, f"coco_{split}_json"), getattr(cfg.data, f"coco_{split}_images")
    if split == "testdev" and not ann:
        return None
    if not ann or not images:
        raise ValueError(f"config: data.coco_{split}_json and data.coco_{split}_images are required")
    return ann, images
