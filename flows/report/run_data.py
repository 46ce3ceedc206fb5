"""What the report reads from a run directory (``flows/report/page.py``): results, top-k,
leaderboard, stage manifests and claims, the config the stages last ran with, the trained
archs, and other runs to compare with. Missing files are empty or None: a run still
searching has most of them missing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pandas as pd

from storage.results import ResultsTable
from storage.run_dir import STAGES

CONFIG_FILE = "config.json"  # report/config.json: the config the stages last ran with


class ReportError(ValueError):
    """A path that is not a run directory; one line naming it."""


@dataclass
class RunData:
    """What the report reads from a run directory (missing files: empty or None)."""

    root: Path
    results: pd.DataFrame
    top_k: pd.DataFrame | None = None
    board: pd.DataFrame | None = None
    manifests: dict[str, dict] = field(default_factory=dict)  # finished stages
    started: dict[str, datetime] = field(default_factory=dict)  # stage -> when it was first claimed
    config: dict | None = None
    trained: list[str] = field(default_factory=list)  # arch ids with full/<id>/checkpoint.pt
    compare: dict[str, pd.DataFrame] = field(default_factory=dict)  # other runs' results, by label


def check_run_dir(path: str | Path) -> Path:
    """``path`` resolved, or :class:`ReportError` when it is not a run directory."""
    root = Path(path)
    if not root.is_dir():
        raise ReportError(f"{path}: no such run directory")
    if not any((root / n).exists() for n in ("results.parquet", "results.parts", "manifests")):
        raise ReportError(f"{path}: not a run directory (no results.parquet, results.parts/ or manifests/)")
    return root.resolve()


def _parquet(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        return None


def _json(path: Path) -> dict | None:
    try:
        out = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return out if isinstance(out, dict) else None


def search_setting(config: dict | None, key: str, fallback=None):
    """``search.<key>`` of a run's config (None: not recorded yet), else ``fallback``."""
    return ((config or {}).get("search") or {}).get(key) or fallback


def policy_of(config: dict | None, fallback: str = "search") -> str:
    return str(search_setting(config, "policy", fallback))


def load_run(path: str | Path, *, compare: Sequence[str | Path] = ()) -> RunData:
    """Read everything the report shows; ``compare``: other run dirs whose reward curves
    are drawn beside this one's (e.g. a random-search run beside a PPO run)."""
    root = check_run_dir(path)
    data = RunData(root=root, results=ResultsTable(root).read())
    data.top_k = _parquet(root / "top_k.parquet")
    data.board = _parquet(root / "leaderboard.parquet")
    data.config = _json(root / "report" / CONFIG_FILE)
    for stage in STAGES:
        if (m := _json(root / "manifests" / f"{stage}.json")) is not None:
            data.manifests[stage] = m
        claim = root / "manifests" / f"{stage}.claim.json"
        if (m or {}).get("started_at"):
            data.started[stage] = pd.Timestamp(m["started_at"]).to_pydatetime()
        elif claim.exists():
            data.started[stage] = datetime.fromtimestamp(claim.stat().st_mtime, timezone.utc)
    if len(data.results) and not (data.manifests.get("search") or {}).get("started_at"):
        data.started["search"] = data.results["started_at"].min().to_pydatetime()  # the first evaluation: sharper than the claim
    full = root / "full"
    data.trained = sorted(p.name for p in full.iterdir() if (p / "checkpoint.pt").exists()) if full.is_dir() else []
    for other in compare:
        o = check_run_dir(other)
        label = f"{policy_of(_json(o / 'report' / CONFIG_FILE), 'run')} ({o.name})"
        data.compare[label] = ResultsTable(o).read()
    return data
