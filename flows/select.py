"""Stage 4, ``select-top-k`` (paper §4.2): the top-20 unique archs by proxy reward -> ``top_k.parquet``."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from flows.stages import artifact_key, publish_summary, stage_flow
from nasfcos.fault_injection import fault_point

STAGE = "select-top-k"


@stage_flow(STAGE)
def select_top_k(cfg, run, config: dict) -> dict:
    from storage.results import ResultsTable

    table = ResultsTable(run.root)
    top = table.top_k(cfg.select.top_k)
    if top.empty:
        raise ValueError(f"{table.path}: no architecture succeeded ({len(table)} rows, none ok); nothing to select")
    if len(top) < cfg.select.top_k:
        get_run_logger().warning("only %d archs succeeded, fewer than select.top_k=%d: selecting them all", len(top), cfg.select.top_k)
    top = table.write_top_k(run.top_k, k=cfg.select.top_k)
    fault_point("select:written")
    create_table_artifact(
        key=artifact_key(cfg, "top-k"),
        table=[
            {"rank": int(r["rank"]), "arch_id": r["arch_id"], "reward": round(float(r["reward"]), 5), "params": int(r["params"]), "macs": int(r["macs"]), "arch": r["arch"]}
            for r in top.to_dict("records")
        ],  # fmt: skip
        description=f"top {cfg.select.top_k} architectures by proxy reward",
    )
    text = f"{len(top)} unique architectures with the highest proxy reward (best {top.reward.max():.4f}) written to `{run.top_k}`."
    publish_summary(cfg, run, STAGE, "select", text, "selection summary")
    return {"top_k": str(run.top_k), "arch_ids": top.arch_id.tolist()}
