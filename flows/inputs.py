"""What stages read: the datasets named by the config and the training settings."""

from __future__ import annotations

from typing import Any

from flows.config import PipelineConfig
from storage.run_dir import RunDir


def train_config(section: Any):
    """A ``nasfcos.engine.train.TrainConfig`` from the ``finetune`` or ``train_full`` config section."""
    from nasfcos.engine.train import TrainConfig

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


def search_dataset(cfg: PipelineConfig, run: RunDir, transforms):
    """The training set of backbone finetuning and the proxy task: VOC (or the synthetic
    set's VOC tree), or with ``data.kind: coco`` the COCO train json without its images
    that have no box (they teach nothing, as in full training)."""
    from nasfcos.data import SHAPES, COCODetection, VOCDetection

    if cfg.data.kind == "coco":
        ann, images = coco_split(cfg, run, "train")
        return COCODetection(ann, images, transforms=transforms, remove_empty=True)
    if cfg.data.kind == "synthetic":
        return VOCDetection(run.data / "VOCdevkit" / "VOC2012", image_set="train", classes=SHAPES, transforms=transforms)
    if not cfg.data.voc_root:
        raise ValueError("config: data.voc_root is required when data.kind is 'voc'")
    return VOCDetection(cfg.data.voc_root, image_set=cfg.data.voc_split, transforms=transforms)


def coco_split(cfg: PipelineConfig, run: RunDir, split: str) -> tuple[str, str] | None:
    """(annotation json, image root) of the COCO ``train``/``val``/``testdev`` split, or None.
    ``data.kind: voc`` reads them for full training and evaluation only; ``coco`` for every stage."""
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
