"""Stage 6, ``evaluate``: COCO val AP (pycocotools) of every fully trained arch, test-dev
detections in the COCO results format, and ``leaderboard.parquet``."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect import task, unmapped
from prefect.artifacts import create_table_artifact

import atomicio
from flows.inputs import coco_split
from flows.placement import device_resources, device_slot
from flows.stages import artifact_key, open_stage, publish_summary, stage_flow, stage_hash, task_options
from nasfcos.fault_injection import fault_point

STAGE = "evaluate"
DETECTIONS_JPG = "detections.jpg"  # full/<arch_id>/: a few val images with the arch's detections
DRAWN_IMAGES = 4


def _stamp(checkpoint: str) -> dict:
    st = Path(checkpoint).stat()  # not the path: a run directory may be moved
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


@task(task_run_name="evaluate {arch_id} on COCO", retries=1)
def evaluate_arch_full(config: dict, arch_id: str, checkpoint: str) -> dict:
    """COCO val AP (and test-dev detections) of one trained arch; skipped when
    ``evaluated.json`` says this very checkpoint was evaluated (a rerun after a kill,
    or after top_k / num_archs changed, evaluates only what is new)."""
    from nasfcos.data import COCODetection, build_transforms
    from nasfcos.engine.checkpoint import detector_from_checkpoint
    from nasfcos.engine.curves import add_scalars
    from nasfcos.evaluation.coco import coco_evaluate, predict_dataset, save_results

    cfg, run, _, _ = open_stage(config, STAGE)
    marker = run.full(arch_id) / "evaluated.json"
    try:
        done = json.loads(marker.read_text())
        if done["stamp"] == _stamp(checkpoint):
            return done["row"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        pass
    model, ckpt = detector_from_checkpoint(checkpoint)
    meta = ckpt.get("meta", {})
    tf = build_transforms(train=False, min_size=meta.get("eval_min_size", 800), max_size=meta.get("eval_max_size", 1333))
    out_dir = run.full(arch_id)
    row = {"arch_id": arch_id}
    with device_slot(cfg.execution) as device:
        model.to(device)
        ann, images = coco_split(cfg, run, "val")
        val = COCODetection(ann, images, transforms=tf)
        # label -> category id as in training (a val json may list its categories otherwise)
        category_ids = meta.get("category_ids", val.category_ids)
        dets = predict_dataset(model, val, category_ids=category_ids, device=device, batch_size=cfg.evaluate.batch_size)
        save_results(dets, out_dir / "detections_val.json")
        metrics = coco_evaluate(val.coco_gt(), dets)
        atomicio.write_json(out_dir / "val_metrics.json", metrics)
        _draw_detections(val, dets, dict(zip(category_ids, meta.get("classes", val.classes), strict=False)), out_dir / DETECTIONS_JPG)
        add_scalars(out_dir, int(ckpt["iteration"]), {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})  # beside its loss curve
        row.update(metrics)
        testdev = coco_split(cfg, run, "testdev")
        if testdev is not None:
            td = COCODetection(testdev[0], testdev[1], transforms=tf)
            path = save_results(predict_dataset(model, td, category_ids=category_ids, device=device, batch_size=cfg.evaluate.batch_size), out_dir / "detections_test-dev.json")
            row["testdev_results"] = str(path)
    # what the model card needs of the checkpoint, so that the card does not load it again
    atomicio.write_json(marker, {"stamp": _stamp(checkpoint), "row": row, "checkpoint": _card_facts(ckpt)})
    fault_point("evaluate:arch")
    return row


def _card_facts(ckpt: dict) -> dict:
    """What an arch's MODEL.md needs of its checkpoint."""
    return {"spec": ckpt["spec"], "meta": ckpt.get("meta", {}), "iteration": int(ckpt["iteration"])}


def _draw_detections(val, dets: list[dict], names: dict[int, str], path: Path) -> None:
    """The first val images with their confident detections drawn, in one row: shown by the
    arch's MODEL.md and, for the best arch, the report. A picture is a view: one that cannot
    be drawn is a warning, not a failed arch."""
    from torchvision.io import encode_jpeg

    from flows.placement import run_logger
    from nasfcos.data import read_image
    from nasfcos.errors import one_line
    from nasfcos.evaluation.drawing import detections_grid

    path.unlink(missing_ok=True)  # an earlier evaluation's
    try:
        items = [(read_image(r.path), [d for d in dets if d["image_id"] == r.image_id]) for r in val.records[:DRAWN_IMAGES]]
        if items:
            # JPEG: photos with boxes; a PNG of four is 5x larger in the self-contained report.html
            atomicio.write_bytes(path, encode_jpeg(detections_grid(items, names), quality=90).numpy().tobytes())
    except Exception as e:  # noqa: BLE001 - see above
        run_logger().warning("%s not drawn: %s", path, one_line(e))


@stage_flow(STAGE)
def evaluate(cfg, run, config: dict) -> dict:
    """COCO val AP of every fully trained arch (pycocotools), test-dev detections, the leaderboard."""
    from storage.results import write_parquet

    upstream = run.manifest("train-full")
    if upstream is None or upstream["config_hash"] != stage_hash(cfg, "train-full"):
        raise ValueError(f"{run.root}: train-full has not finished for this config; run it (or nas-search) first")
    every = upstream["outputs"]["trained"]  # searched archs, then baselines (kind)
    trained = [t for t in every if t.get("status", "ok") == "ok"]
    failed = [{"arch_id": t["arch_id"], "status": "failed", "error": t["error"]} for t in every if t.get("status", "ok") != "ok"]
    with device_resources(cfg.execution):  # on Dask: a whole GPU each
        futures = evaluate_arch_full.with_options(**task_options(cfg, "evaluate")).map(
            config=unmapped(config), arch_id=[t["arch_id"] for t in trained], checkpoint=[t["checkpoint"] for t in trained]
        )
    rows = [{**f.result(), "status": "ok", "error": ""} for f in futures]
    top = pd.read_parquet(run.top_k)[["arch_id", "arch", "reward", "params", "macs"]].rename(columns={"reward": "proxy_reward"})
    base = pd.DataFrame([t for t in every if t.get("kind") == "baseline"], columns=["arch_id", "arch", "proxy_reward", "params", "macs"])
    info = pd.concat([top.assign(kind="searched"), base.assign(kind="baseline")], ignore_index=True)
    columns = ["arch_id", "AP", "AP50", "AP75", "APs", "APm", "APl", "status", "error"]
    metrics = pd.DataFrame(rows + failed, columns=list(dict.fromkeys(columns + [k for r in rows for k in r])))
    # a failed arch keeps its row (status, error; no AP), after the evaluated ones
    board = info.merge(metrics, on="arch_id").sort_values("AP", ascending=False, na_position="last")
    write_parquet(board, run.leaderboard)
    _model_cards(cfg, run, board, config, {t["arch_id"]: t for t in trained})
    create_table_artifact(
        key=artifact_key(cfg, "leaderboard"),
        table=board[["arch_id", "kind", "AP", "AP50", "AP75", "proxy_reward", "params", "status"]].round(4).to_dict("records"),
        description="COCO val AP of the fully trained architectures",
    )
    best = f"best `{board.iloc[0].arch_id}`: AP {board.iloc[0].AP:.3f}, AP50 {board.iloc[0].AP50:.3f}" if len(board) else "nothing was trained"
    text = f"{len(board)} fully trained architectures evaluated with pycocotools; {best}. Leaderboard: `{run.leaderboard}`."
    publish_summary(cfg, run, STAGE, "evaluate", text, "evaluation summary")
    return {"leaderboard": str(run.leaderboard), "best_AP": float(board.AP.max()) if len(board) else float("nan")}


def _model_cards(cfg, run, board: pd.DataFrame, config: dict, trained: dict) -> None:
    """``full/<arch_id>/MODEL.md`` of every arch that trained (flows/report/model_card.py)."""
    from flows.placement import run_logger
    from flows.report.model_card import model_card, write_model_card
    from nasfcos.arch import resolve
    from nasfcos.engine.checkpoint import load_checkpoint
    from nasfcos.errors import one_line
    from nasfcos.model.complexity import complexity

    results = pd.read_parquet(run.root / "results.parquet") if (run.root / "results.parquet").exists() else None
    for row in board[board.status == "ok"].itertuples():
        try:
            facts = json.loads((run.full(row.arch_id) / "evaluated.json").read_text()).get("checkpoint")
            if facts is None:  # evaluated before the marker kept them
                facts = _card_facts(load_checkpoint(trained[row.arch_id]["checkpoint"]))
            spec = facts["spec"]
            full = complexity(str(resolve(row.arch)), backbone=spec["backbone"], width=spec["width"], head_width=spec["head_width"], num_classes=spec["num_classes"])
            drawn = DETECTIONS_JPG if (run.full(row.arch_id) / DETECTIONS_JPG).exists() else None
            text = model_card(pd.Series(row._asdict()), board, config, results, meta=facts["meta"], iteration=facts["iteration"], full=full, detections=drawn)
            write_model_card(run.full(row.arch_id) / "MODEL.md", text)
        except Exception as e:  # noqa: BLE001 - a card is a view: the leaderboard is what counts
            run_logger().warning("%s: MODEL.md not written: %s", row.arch_id, one_line(e))
