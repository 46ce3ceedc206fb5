"""Stage bookkeeping: which config a stage's durable files depend on, claiming and
skipping stages in a run directory, run names, artifact keys, portable task parameters."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run

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
# Fields that say where a stage runs, not what it computes: in no hash, so a run dir
# trained on one device per arch resumes (and stays done) on groups of several.
_PLACEMENT = {"train_full": {"devices_per_arch"}}


def _sections(cfg: PipelineConfig, stage: str, *, extendable: bool) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for s in _STAGE_SECTIONS[stage]:
        d = {k: v for k, v in getattr(cfg, s).model_dump(mode="json").items() if k not in _PLACEMENT.get(s, set())}
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
