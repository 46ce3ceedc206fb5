"""`make ui-shots`: headless-chromium screenshots of the Prefect UI for the latest
`nas-search` run on the local server (`make demo`): its run page, the artifacts page and
the search and train-full artifacts (their plots), into runs/<run_id>/ui/. Not part of `make test`.

Exit 2 with the install line when chromium is missing; exit 1 with one line when there is
no server or no run to show."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLOT_STAGES = ("search", "train-full")  # the reward curve; every arch's loss curve (issue #28)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str | None:
    return next((p for b in BROWSERS if (p := shutil.which(b))), None)


async def latest(api: str) -> tuple[dict, list[dict]]:
    """(latest nas-search flow run, its run's markdown artifacts holding PNGs)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType, FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["nas-search"])), sort=FlowRunSort.START_TIME_DESC, limit=1)
        if not runs:
            raise LookupError(f"{api}: no nas-search flow run yet; run `make demo` first")
        run = runs[0]
        config = (run.parameters or {}).get("config", "demo")
        run_id = config.get("run_id", "demo") if isinstance(config, dict) else str(config)
        run_id = (run.parameters or {}).get("overrides", {}).get("run_id", run_id)
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["markdown"])), sort=ArtifactSort.CREATED_DESC, limit=200)
        plots = [{"id": str(a.id), "key": a.key} for a in arts if a.key and a.key.startswith(f"{run_id}-") and "data:image/png;base64," in str(a.data)]
        return {"id": str(run.id), "name": run.name, "run_id": run_id, "state": run.state_name}, plots


def shoot(chrome: str, url: str, out: Path, size: str) -> None:
    """One screenshot; the virtual-time budget lets the UI's JavaScript fetch and render."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chrome, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--window-size={size}", "--virtual-time-budget=20000", f"--screenshot={out}", url]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    if not out.exists() or out.stat().st_size == 0:
        raise RuntimeError(f"{chrome} wrote no screenshot for {url}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    ap.add_argument("--size", default="1600,1100", help="window size W,H")
    args = ap.parse_args()
    chrome = browser()
    if chrome is None:
        print("ui-shots: chromium not found; install it (Debian: `apt-get install -y chromium`) and run `make ui-shots` again", file=sys.stderr)
        return 2
    api = os.environ.setdefault("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    ui = api.removesuffix("/api")
    try:
        run, plots = asyncio.run(latest(api))
    except LookupError as e:
        print(f"ui-shots: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - no server: one line
        print(f"ui-shots: cannot read runs from {api} ({type(e).__name__}); start it with `make demo`", file=sys.stderr)
        return 1
    out = args.runs_dir / run["run_id"] / "ui"
    out.mkdir(parents=True, exist_ok=True)
    shots = {"run.png": f"{ui}/runs/flow-run/{run['id']}", "artifacts.png": f"{ui}/artifacts"}
    for stage in PLOT_STAGES:  # each stage's latest plot artifact (read newest first)
        if pick := next((p for p in plots if p["key"].endswith(f"-{stage}")), None):
            shots[f"plot-{stage}.png"] = f"{ui}/artifacts/artifact/{pick['id']}"
    for name, url in shots.items():
        shoot(chrome, url, out / name, args.size)
        print(f"{out / name}  <- {url}")
    if not plots:
        print(f"ui-shots: run {run['run_id']} has no plot artifacts yet (state {run['state']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
