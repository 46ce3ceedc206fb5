"""Fingerprint of a whole ``tiny`` pipeline run: every reward, the top-k and the AP, exactly.

Behaviour-preserving changes (the house redesign, renames, lint fixes) must leave it
bit-identical; run it before and after and compare the JSON::

    python benchmarks/tiny_fingerprint.py --out /tmp/before.json      # on the old commit
    python benchmarks/tiny_fingerprint.py --out /tmp/after.json       # on the new one
    cmp /tmp/before.json /tmp/after.json

It runs ``python -m flows.nas_search --config tiny`` in a fresh run directory (its own
ephemeral Prefect server) and reads only the run's durable files, so it works on any
layout of the code. Floats are written with ``float.hex``: equal text means equal bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch


def fingerprint(run: Path) -> dict:
    rows = pd.read_parquet(run / "results.parquet").sort_values("arch_id")
    top = pd.read_parquet(run / "top_k.parquet")
    board = pd.read_parquet(run / "leaderboard.parquet")
    metrics = {p.parent.name: json.loads(p.read_text()) for p in sorted((run / "full").glob("*/val_metrics.json"))}
    weights = {}
    for ckpt in sorted((run / "full").glob("*/checkpoint.pt")):  # the fully trained detectors, bit for bit
        model = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
        digest = hashlib.sha256()
        for name, t in sorted(model.items()):
            digest.update(name.encode() + t.contiguous().numpy().tobytes())
        weights[ckpt.parent.name] = digest.hexdigest()[:16]
    return {
        "weights": weights,
        "rewards": {a: float(r).hex() for a, r in zip(rows.arch_id, rows.reward, strict=True)},
        "top_k": top.arch_id.tolist(),
        "leaderboard": board.arch_id.tolist(),
        "ap": {a: {k: float(v).hex() for k, v in sorted(m.items()) if isinstance(v, float)} for a, m in metrics.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the fingerprint JSON here (default: print it)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override of the tiny run (repeatable), e.g. search.mode=sync")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "PREFECT_HOME": str(Path(tmp) / "prefect"),
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        }  # a fresh home migrates first
        cmd = [sys.executable, "-m", "flows.nas_search", "--config", "tiny", "--set", f"runs_dir={tmp}", "--set", "run_id=fingerprint"]
        cmd += [arg for kv in args.set for arg in ("--set", kv)]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        text = json.dumps(fingerprint(Path(tmp) / "fingerprint"), indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
