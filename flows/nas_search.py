"""The parent flow ``nas-search``: the six stages in order as subflows for one run directory.

Every stage is skipped when its manifest matches the config, and resumes from its
own durable files when it died part-way, so re-running a run is always safe::

    prefect deployment run nas-search/demo
    python -m flows.nas_search --config demo --set search.total_archs=64     # without a deployment
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

import yaml
from prefect import flow, get_run_logger

from flows.config import ConfigError, load_config
from flows.evaluate import evaluate
from flows.finetune import finetune_backbone
from flows.materialise import materialise_features
from flows.placement import task_runner
from flows.preflight import PreflightError, preflight
from flows.search import search
from flows.select import select_top_k
from flows.stages import owner, portable
from flows.train_full import train_full
from nasfcos.errors import one_line
from storage.run_dir import RunDir
from storage.run_lock import RunLocked, run_lock


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters or {}
    return f"{(p.get('overrides') or {}).get('run_id') or p.get('config', 'demo')} · nas-search"


@flow(name="nas-search", flow_run_name=_run_name, log_prints=True)
def nas_search(config: str = "demo", overrides: dict[str, Any] | None = None) -> dict:
    """Run (or resume) the whole NAS-FCOS pipeline.

    Args:
        config: a preset name (``demo``, ``paper``) or a YAML file path.
        overrides: dotted keys, e.g. ``{"search.total_archs": 64, "execution.devices": ["cuda:0"]}``.
    """
    cfg = load_config(config, overrides)
    preflight(cfg)  # every path and device of the unfinished stages, before stage 1
    c = portable(cfg)
    run = RunDir.at(cfg.runs_dir, cfg.run_id)
    log = get_run_logger()
    log.info("run %s in %s", cfg.run_id, run.root)
    with run_lock(run.root, owner()):  # the subflows re-enter it: one owner for the whole pipeline
        outputs = {  # each subflow with fan-out gets its own runner (a Dask cluster per stage)
            "finetune-backbone": finetune_backbone(c),
            "materialise-features": materialise_features.with_options(task_runner=task_runner(cfg))(c),
            "search": search.with_options(task_runner=task_runner(cfg))(c),
            "select-top-k": select_top_k(c),
            "train-full": train_full.with_options(task_runner=task_runner(cfg))(c),
            "evaluate": evaluate.with_options(task_runner=task_runner(cfg))(c),
        }
    log.info("run %s finished: results %s, leaderboard %s", cfg.run_id, run.root / "results.parquet", run.leaderboard)
    return {"run_dir": str(run.root), **outputs}


def _stop(signum, frame) -> None:
    """SIGTERM (preemption by SLURM or Kubernetes, ``kill``) ends the run like Ctrl-C: the
    flow is marked crashed, the run lock released, the temporary Prefect server stopped
    (Python's default for SIGTERM skips all of it and leaves that server an orphan). Tasks
    still running elsewhere are left to the run epoch: the next owner fences them."""
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the nas-search flow in this process (no deployment needed).")
    ap.add_argument("--config", default="demo", help="preset name or YAML path (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, value parsed as YAML")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    try:  # a bad config or a run already running: one line, before any flow starts
        cfg = load_config(args.config, overrides)
        preflight(cfg)
        with run_lock(RunDir.at(cfg.runs_dir, cfg.run_id).root, f"python -m flows.nas_search --config {args.config}"):
            out = nas_search(config=args.config, overrides=overrides)
    except (ConfigError, PreflightError, RunLocked) as e:
        sys.exit(f"nas-search: {e}")
    except Exception as e:  # noqa: BLE001 - Prefect has logged the traceback above
        sys.exit(f"nas-search failed: {one_line(e)}")
    except KeyboardInterrupt as e:
        sys.exit(f"nas-search stopped ({e or 'interrupted'}); run it again to resume")
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
