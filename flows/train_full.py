"""Stage 5, ``train-full`` (paper §4.2): train the selected decoders with the backbone on COCO,
each resumable from ``full/<arch-id>/checkpoint.pt`` and data-parallel over
``train_full.devices_per_arch`` devices: one parallel task per group of devices in the
stage's process, or (``train_full.jobs``) one flow run per arch on a work pool
(``flows/train_jobs.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from prefect import task, unmapped

from flows.config import PipelineConfig
from flows.inputs import coco_split, train_config
from flows.placement import device_group, device_resources, run_logger
from flows.stages import open_stage, publish_summary, results_with_progress, stage_flow, task_options
from storage.run_dir import RunDir

STAGE = "train-full"


def initial_weights(cfg: PipelineConfig, run: RunDir) -> tuple[str | None, Path | None]:
    """(backbone weights, init checkpoint) of full training. Only ``train_full.weights``
    names backbone weights: ``finetune.weights`` (the paper's COCO-trained FCOS) must not
    leak into COCO training. From the finetuned checkpoint only the backbone is taken:
    its FPN-FCOS decoder would give the ``fpn-fcos`` baseline a trained decoder while
    every searched decoder starts from scratch."""
    t = cfg.train_full
    if t.init_from_finetuned:
        return None, run.backbone / "checkpoint.pt"
    return t.weights, None


def to_train(cfg: PipelineConfig, run: RunDir) -> pd.DataFrame:
    """(arch_id, arch, kind) of what this stage trains: the first ``num_archs`` of
    top_k.parquet, then the baselines (named by their preset name; one the search
    also found is trained once, as a searched arch)."""
    from nasfcos.arch import PRESETS, resolve

    top = pd.read_parquet(run.top_k).head(cfg.train_full.num_archs)[["arch_id", "arch"]].assign(kind="searched")
    base = [(b if b in PRESETS else resolve(b).arch_id, str(resolve(b))) for b in cfg.train_full.baselines]
    base = pd.DataFrame([(i, a, "baseline") for i, a in base if a not in set(top.arch)], columns=["arch_id", "arch", "kind"])
    return pd.concat([top, base], ignore_index=True)


def baseline_proxy(cfg: PipelineConfig, run: RunDir, arch: str, arch_id: str) -> dict:
    """The baseline's proxy reward, params and MACs, scored as the search scores an arch
    (so the leaderboard can set it against the searched ones); durable in
    ``full/<arch_id>/proxy.json``."""
    import json

    import atomicio
    from flows import feature_cache
    from flows.search import proxy_record

    path = run.full(arch_id) / "proxy.json"
    if path.exists():
        return json.loads(path.read_text())
    try:
        r = proxy_record(cfg, run, arch)
    finally:  # the proxy features must not hold memory during full training
        feature_cache.free()
    out = {"proxy_reward": r["reward"] if r["status"] == "ok" else float("nan"), "params": r["params"], "macs": r["macs"]}
    atomicio.write_json(path, out)
    return out


def arch_info(cfg: PipelineConfig, run: RunDir, arch: str, arch_id: str, kind: str) -> dict:
    """The leaderboard record's identity; a baseline is first scored on the proxy task."""
    return {"arch_id": arch_id, "arch": arch, "kind": kind} | (baseline_proxy(cfg, run, arch, arch_id) if kind == "baseline" else {})


def train_on(cfg: PipelineConfig, run: RunDir, info: dict, devices: Sequence[str], *, fence=None, launch: dict | None = None) -> dict:
    """Train one arch on ``devices`` (resumable): the leaderboard record. A diverging arch
    (non-finite loss) or one that does not fit its devices gives a ``failed`` record, so
    the other archs finish; the same code in a stage task and in a ``train-arch`` job."""
    import torch

    from nasfcos.data import COCODetection, build_transforms
    from nasfcos.engine.distributed import train_on_devices
    from nasfcos.errors import one_line
    from nasfcos.model.detector import DetectorSpec

    t, arch_id = cfg.train_full, info["arch_id"]
    tc = train_config(t)
    ann, images = coco_split(cfg, run, "train")
    dataset = COCODetection(ann, images, transforms=build_transforms(train=True, min_size=tc.min_size, max_size=tc.max_size), remove_empty=True)
    spec = DetectorSpec(num_classes=len(dataset.classes), backbone=cfg.finetune.backbone, decoder=info["arch"], width=t.width, head_width=t.head_width)
    meta = {"classes": list(dataset.classes), "category_ids": list(dataset.category_ids), "eval_min_size": max(tc.min_size), "eval_max_size": tc.max_size}
    weights, init = initial_weights(cfg, run)
    try:
        result = train_on_devices(
            spec,
            dataset,
            tc,
            run.full(arch_id),
            devices=devices,
            max_restarts=cfg.execution.max_restarts,
            backbone_weights=weights,
            init_checkpoint=init,
            init_prefix="backbone.",
            meta=meta,
            **({"fence": fence} if fence is not None else {}),
            **(launch or {}),  # a job's nodes / launcher
        )
    except (FloatingPointError, torch.OutOfMemoryError) as e:  # the arch's fault (alone on its devices): a failed row
        error = one_line(e)
        run_logger().error("%s: training failed, the other archs go on: %s", arch_id, error)
        return info | {"checkpoint": "", "iteration": -1, "status": "failed", "error": error}
    run_logger().info("%s: trained %d iterations, losses %s", arch_id, result.iteration, result.last_losses)
    return info | {"checkpoint": str(result.checkpoint), "iteration": result.iteration, "status": "ok", "error": ""}


@task(task_run_name="train {arch_id}", retries=1)
def train_arch(config: dict, arch: str, arch_id: str, kind: str = "searched") -> dict:
    """Train one arch inside the stage's process (``train_full.jobs: null``) on a group of its devices."""
    from storage.train_jobs import read_trained, write_trained

    cfg, run, _, _ = open_stage(config, STAGE)
    done = read_trained(run.full(arch_id))
    if done is not None and done.get("arch") == arch and done["status"] == "ok":  # a rerun: no training group to start
        return {k: v for k, v in done.items() if k != "job"}
    info = arch_info(cfg, run, arch, arch_id, kind)
    with device_group(cfg.execution, cfg.train_full.devices_per_arch) as devices:
        record = train_on(cfg, run, info, devices)
    write_trained(run.full(arch_id), record)
    return record


@stage_flow(STAGE)
def train_full(cfg, run, config: dict) -> dict:
    """Train the top-k archs (and the baselines) in full, one task per arch, resumable."""
    todo = to_train(cfg, run)
    seen = 0.0

    def curves() -> None:  # the summary artifact, its loss plot redrawn while the archs train (when a curve moved)
        nonlocal seen
        latest = max((p.stat().st_mtime for p in run.root.glob("full/*/tb/*")), default=0.0)
        if latest > seen:
            seen = latest
            text = f"Training {len(todo)} archs (baselines included): in progress.\n\n" + "\n".join(_line(run, a) for a in todo.arch_id)
            publish_summary(cfg, run, STAGE, "train-full", text, "full training (in progress)")

    refresh = curves if cfg.execution.report else None
    description = f"archs fully trained out of {len(todo)} (baselines included)"
    if cfg.train_full.jobs:  # a flow run per arch on a work pool
        from flows.train_jobs import run_jobs

        trained = run_jobs(cfg, run, todo, config, description=description, refresh=refresh)
    else:
        with device_resources(cfg.execution):  # on Dask: a whole GPU each
            futures = train_arch.with_options(**task_options(cfg, "train_full")).map(
                config=unmapped(config), arch=todo.arch.tolist(), arch_id=todo.arch_id.tolist(), kind=todo.kind.tolist()
            )
        trained = results_with_progress(cfg, "train-full", futures, description=description, refresh=refresh, every_s=300)
    failed = [t for t in trained if t["status"] != "ok"]
    if failed and len(failed) == len(trained):
        raise RuntimeError(f"train-full: every arch failed, e.g. {failed[0]['arch_id']}: {failed[0]['error']}")
    publish_summary(cfg, run, STAGE, "train-full", "\n".join(_line(run, t["arch_id"], t) for t in trained), "full training")
    return {"trained": trained}


def _line(run: RunDir, arch_id: str, record: dict | None = None) -> str:
    """An arch in train-full's summary: trained, failed, or still training (its record, or
    ``full/<arch_id>/trained.json`` as its task or job left it)."""
    from storage.train_jobs import read_trained

    t = record or read_trained(run.full(arch_id))
    if t is None:
        return f"- `{arch_id}`: training"
    if t["status"] != "ok":
        return f"- `{arch_id}`: **failed**: {t['error']}"
    return f"- `{arch_id}`: {t['iteration']} iterations, `{t['checkpoint']}`"
