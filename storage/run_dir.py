"""Run directories: layout, atomic writes, config hashing and stage manifests.

One directory per run (``runs/<run-id>/``); every stage reads its inputs from it
and writes its outputs into it. A stage that finishes writes
``manifests/<stage>.json`` (config hash, versions, finished-at, outputs); a stage
whose manifest matches its config is skipped, and one that died part-way
resumes from its own durable files.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import atomicio

STAGES = ("finetune-backbone", "materialise-features", "search", "select-top-k", "train-full", "evaluate")
_VERSIONED = ("nasfcos", "torch", "torchvision", "prefect", "zarr", "numcodecs", "pycocotools", "pandas")
# Packages whose version changes what a stage computes (weights, features, rewards).
NUMERIC = ("nasfcos", "torch", "torchvision")


def config_hash(config: Any) -> str:
    """Stable 16-hex-digit hash of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def host() -> dict[str, str | int]:
    """The CPU and the kernels torch picked for it: float results differ between hosts whose
    instruction sets differ (docs/fidelity.md, "Reproducibility"), so a manifest names them."""
    import torch  # the stages that write manifests all run torch

    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.processor() or "unknown")
    return {"cpu": model, "machine": platform.machine(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass(frozen=True)
class RunDir:
    """Paths of one run. Everything a stage writes lives under ``root``."""

    root: Path

    @classmethod
    def at(cls, runs_dir: str | Path, run_id: str) -> "RunDir":
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ValueError(f"run_id {run_id!r}: must be a plain directory name")
        root = Path(runs_dir).resolve() / run_id
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def backbone(self) -> Path:
        return self.root / "backbone"

    @property
    def features(self) -> Path:
        return self.root / "features.zarr"

    @property
    def controller(self) -> Path:
        return self.root / "controller.pt"

    @property
    def top_k(self) -> Path:
        return self.root / "top_k.parquet"

    @property
    def leaderboard(self) -> Path:
        return self.root / "leaderboard.parquet"

    def full(self, arch_id: str) -> Path:
        return self.root / "full" / arch_id

    def manifest_path(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return self.root / "manifests" / f"{stage}.json"

    def manifest(self, stage: str) -> dict | None:
        """The stage's manifest, or None when it has not finished (or is unreadable)."""
        path = self.manifest_path(stage)
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_done(self, stage: str, cfg_hash: str) -> bool:
        m = self.manifest(stage)
        return m is not None and m.get("config_hash") == cfg_hash

    def claim(self, stage: str, fields: dict[str, Any], *, legacy: str | None = None) -> None:
        """Mark the run dir's files of ``stage`` as made under ``fields`` (the config fields
        they depend on). A later attempt under other fields would resume from files made
        under a different config, so it is refused with one line naming the fields that
        differ. ``legacy``: the key a claim from before fields were recorded must match."""
        path = self.root / "manifests" / f"{stage}.claim.json"
        key = config_hash(fields)
        try:
            held = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            held = None
        if not isinstance(held, dict) or "key" not in held:
            atomicio.write_json(path, {"stage": stage, "key": key, "fields": fields, "versions": versions()})
            return
        if held["key"] == key:
            return
        if "fields" not in held:  # an older claim: only its key
            if held["key"] == legacy:
                atomicio.write_json(path, {"stage": stage, "key": key, "fields": fields, "versions": versions()})
                return
            raise ValueError(f"{self.root}: stage {stage} has files from another config (key {held['key']}); use a new run_id, or delete the run directory")
        old = held["fields"]
        diff = [f"{k} {old.get(k, '(unset)')} -> {fields.get(k, '(unset)')}" for k in sorted(set(old) | set(fields)) if old.get(k) != fields.get(k)]
        raise ValueError(f"{self.root}: stage {stage} has files made with another config ({'; '.join(diff)}); change them back, or use a new run_id")

    def version_changes(self, stage: str) -> tuple[list[str], list[str]]:
        """(changes in finished stages' manifests, changes in ``stage``'s own unfinished
        claim) of the :data:`NUMERIC` packages against this process's versions, as
        ``"<file>: torch 2.11.0 -> 2.14.1"``. The second kind would mix two versions'
        results in one stage's outputs."""
        now = versions()

        def diff(path: Path) -> list[str]:
            try:
                had = json.loads(path.read_text()).get("versions") or {}
            except (FileNotFoundError, json.JSONDecodeError):
                return []
            changed = [f"{k} {had[k]} -> {now[k]}" for k in NUMERIC if k in had and had[k] != now[k]]
            return [f"{path.relative_to(self.root)}: {', '.join(changed)}"] if changed else []

        finished = [c for s in STAGES if (c := diff(self.manifest_path(s)))]
        mine = [] if self.manifest(stage) else diff(self.root / "manifests" / f"{stage}.claim.json")
        return [x for c in finished for x in c], mine

    def finish(self, stage: str, cfg_hash: str, outputs: dict | None = None) -> dict:
        """Write the stage's manifest (last, atomically: a crash before it means not done)."""
        manifest = {
            "stage": stage,
            "config_hash": cfg_hash,
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "versions": versions(),
            "host": host(),
            "outputs": outputs or {},
        }
        atomicio.write_json(self.manifest_path(stage), manifest)
        return manifest
