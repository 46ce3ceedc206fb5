"""Stage 2, ``materialise-features`` (paper §4.1): backbone features of meta-train / meta-val
into ``features.zarr``, one parallel task per shard; done shards are never recomputed."""

from __future__ import annotations

from prefect import get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact

from flows.inputs import search_dataset
from flows.placement import device_resources, device_slot
from flows.stages import artifact_key, open_stage, results_with_progress, stage_flow, task_options
from nasfcos.fault_injection import fault_point

STAGE = "materialise-features"
SPLITS = ("meta_train", "meta_val")
STRIDES = (4, 8, 16, 32)


def _split_indices(cfg, n: int):
    """Dataset indices of meta-train and meta-val: ``features.train_size``/``val_size``,
    scaled down in proportion when the dataset has fewer images (``nasfcos.engine.materialise.fit_split``)."""
    from nasfcos.engine.materialise import fit_split, meta_split

    train_size, val_size = fit_split(n, cfg.features.train_size, cfg.features.val_size)
    return dict(zip(SPLITS, meta_split(n, train_size=train_size, val_size=val_size, seed=cfg.features.seed), strict=True))


@task(task_run_name="create store")
def create_store(config: dict) -> dict:
    import torch

    from nasfcos.engine.checkpoint import weights_sha256
    from nasfcos.model.backbones import build_backbone
    from storage.features import FeatureStore

    cfg, run, _, _ = open_stage(config, STAGE)
    f = cfg.features
    if f.crop % 32:
        raise ValueError(f"config: features.crop must be a multiple of 32, got {f.crop}")
    dataset = search_dataset(cfg, run, None)
    idx = _split_indices(cfg, len(dataset))
    want = (f.train_size, f.val_size if f.val_size is not None else len(dataset) - f.train_size)
    if (len(idx["meta_train"]), len(idx["meta_val"])) != want:
        get_run_logger().warning(
            "features: the search's training set has only %d images, fewer than features.train_size %d + features.val_size %s: "
            "meta-train %d / meta-val %d instead (the same proportion)",
            len(dataset), f.train_size, f.val_size if f.val_size is not None else "(the rest)", len(idx["meta_train"]), len(idx["meta_val"]),
        )  # fmt: skip
    with torch.device("meta"):  # its shape only
        channels = build_backbone(cfg.finetune.backbone, freeze_at=0).out_channels
    levels = {f"C{i + 2}": (c, f.crop // s, f.crop // s) for i, (c, s) in enumerate(zip(channels, STRIDES, strict=True))}
    ckpt = run.backbone / "checkpoint.pt"
    attrs = {
        "backbone": cfg.finetune.backbone, "backbone_weights_sha256": weights_sha256(ckpt), "split_seed": f.seed,
        "crop": f.crop, "classes": list(dataset.classes), "num_classes": len(dataset.classes),
    }  # fmt: skip
    store = FeatureStore.create(run.features, splits={k: len(v) for k, v in idx.items()}, levels=levels, shard_size=f.shard_size, codec=f.codec, attrs=attrs)
    return {s: store.pending(s) for s in SPLITS}


@task(task_run_name="materialise {split} shard {shard}", retries=1)
def materialise_shard(config: dict, split: str, shard: int) -> int:
    import torch

    from nasfcos.engine.materialise import FeatureComputer, proxy_transforms
    from nasfcos.model.backbones import build_backbone
    from nasfcos.rng import local_generator
    from storage.features import FeatureStore, materialise

    cfg, run, _, _ = open_stage(config, STAGE)
    dataset = search_dataset(cfg, run, proxy_transforms(cfg.features.crop))
    idx = _split_indices(cfg, len(dataset))[split]
    with device_slot(cfg.execution) as device:
        with local_generator(torch.Generator()):  # the finetuned weights replace its init: no draw from the process's generator
            backbone = build_backbone(cfg.finetune.backbone, weights=run.backbone / "checkpoint.pt", freeze_at=0)
        compute = FeatureComputer(backbone, dataset, idx, seed=cfg.features.seed, device=device, batch_size=cfg.features.batch_size)
        materialise(FeatureStore.open(run.features), split, compute, shards=[shard])
    fault_point("materialise:shard")
    return shard


def _damaged(cfg, run) -> bool:
    """A finished store with shards found damaged on read since (storage/features.py): they are recomputed."""
    from storage.features import FeatureStore

    store = FeatureStore.open(run.features)
    damaged = {split: p for split in SPLITS if (p := store.pending(split))}
    if damaged:
        get_run_logger().warning("%s: shards %s were found damaged and are recomputed", run.features, damaged)
    return bool(damaged)


@stage_flow(STAGE, redo=_damaged)
def materialise_features(cfg, run, config: dict) -> dict:
    """Compute C2..C5 at the proxy geometry for both splits, shard by shard in parallel."""
    from storage.features import FeatureStore

    pending = create_store.with_options(**task_options(cfg, "materialise"))(config)
    futures = []
    for split in SPLITS:
        if pending[split]:
            with device_resources(cfg.execution):  # on Dask: a whole GPU each
                futures += materialise_shard.with_options(**task_options(cfg, "materialise")).map(config=unmapped(config), split=unmapped(split), shard=pending[split])
    total = sum(FeatureStore.open(run.features).num_shards(split) for split in SPLITS)
    todo = sum(len(v) for v in pending.values())
    written = results_with_progress(cfg, "features", futures, done=total - todo, total=total, description=f"feature shards done out of {total}")
    out = {"store": str(run.features), "shards_written": len(written)}
    sizes = FeatureStore.open(run.features).splits  # features.train_size/val_size, or fewer (fit_split)
    create_markdown_artifact(
        key=artifact_key(cfg, "features"),
        markdown=f"# {STAGE}\n\n`{run.features}`: meta_train {sizes['meta_train']} / meta_val "
        f"{sizes['meta_val']} images at {cfg.features.crop}x{cfg.features.crop}; "
        f"{len(written)} shards written in this run, codec {cfg.features.codec}.",
        description="feature store",
    )
    return out
