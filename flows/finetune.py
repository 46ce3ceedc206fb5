"""Stage 1, ``finetune-backbone`` (paper §4.1): R-50 + FPN-FCOS finetuned on VOC.

Writes ``backbone/checkpoint.pt`` (resumable mid-training: a re-run continues
from the last checkpoint).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.inputs import ensure_data, search_dataset, train_config
from flows.stages import artifact_key, open_stage, stage_flow, task_options

STAGE = "finetune-backbone"


@task(task_run_name="prepare data")
def prepare_data(config: dict) -> None:
    cfg, run, _, _ = open_stage(config, STAGE)
    ensure_data(cfg, run)


@task(task_run_name="train backbone + FPN-FCOS", retries=1)
def train_backbone(config: dict) -> dict:
    from nasfcos.data import build_transforms
    from nasfcos.engine.distributed import train_on_devices
    from nasfcos.model.detector import DetectorSpec

    cfg, run, _, _ = open_stage(config, STAGE)
    f = cfg.finetune
    tc = train_config(cfg.finetune)
    tf = build_transforms(train=True, min_size=tc.min_size, max_size=tc.max_size, crop=tc.crop or None)
    dataset = search_dataset(cfg, run, tf)
    spec = DetectorSpec(num_classes=len(dataset.classes), backbone=f.backbone, width=f.width)
    meta = {"classes": list(dataset.classes), "category_ids": list(dataset.category_ids)}
    devices = cfg.execution.devices[: f.devices]
    result = train_on_devices(spec, dataset, tc, run.backbone, devices=devices, max_restarts=cfg.execution.max_restarts, backbone_weights=f.weights, meta=meta)
    return {"checkpoint": str(result.checkpoint), "iteration": result.iteration, "losses": result.last_losses, "classes": meta["classes"]}


@stage_flow(STAGE)
def finetune_backbone(cfg, run, config: dict) -> dict:
    """Finetune the backbone (with an FPN-FCOS decoder) on the search's training set
    (VOC, the synthetic set, or with ``data.kind: coco`` the COCO train json)."""
    prepare_data.with_options(**task_options(cfg, "finetune"))(config)
    out = train_backbone.with_options(**task_options(cfg, "finetune"))(config)
    get_run_logger().info("backbone checkpoint %s (iteration %d)", out["checkpoint"], out["iteration"])
    create_markdown_artifact(
        key=artifact_key(cfg, "finetune"),
        markdown=f"# {STAGE}\n\nBackbone `{cfg.finetune.backbone}` + FPN-FCOS @{cfg.finetune.width} trained for "
        f"{out['iteration']} iterations on {cfg.data.kind} data.\n\nFinal losses: {out['losses']}\n\nCheckpoint: `{out['checkpoint']}`",
        description="backbone finetuning",
    )
    return out
