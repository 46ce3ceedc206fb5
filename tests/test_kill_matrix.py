"""The kill matrix: a pipeline process (``flows.nas_search``'s ``main``, forked warm) SIGKILLed
once inside each of the six stages, each time resumed by the next process, writes the same
files, bit for bit, as an uninterrupted run of the same config and seed in a fresh
interpreter (``python -m flows.nas_search``: another hash seed, its own imports); both search
in sync mode on two evaluation slots that finish in opposite orders (issues #11 and #25)."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import finish, pipeline_process, run_files, tiny_args

ROOT = Path(__file__).resolve().parents[1]
# (stage killed in, fault point inside it): nasfcos/fault_injection.py; each kill happens in a
# process that resumed the previous one's run directory
KILLS = [
    ("finetune-backbone", "train:checkpointed"),  # after the first of its 2 checkpoints
    ("materialise-features", "materialise:shard"),  # after the first of 3 shards
    ("search", "search:row#2"),  # after the second of 4 evaluations
    ("select-top-k", "select:written"),  # top_k.parquet written, manifest not
    ("train-full", "train:checkpointed"),  # after the first of 2 checkpoints
    ("evaluate", "evaluate:arch"),  # the arch evaluated, manifest not
]


def _first(slot: int, gate: Path) -> list[str]:
    """Fault rules by which sample ``slot`` of the first step finishes first: the other one
    (2 archs per step, one per slot) waits at its start until the step's first row is
    written. Sync: the reference lets sample 0 finish first, the killed chain sample 1."""
    return [f"search:evaluate:{1 - slot}#1=wait:{gate}", f"search:row#1=touch:{gate}"]


# durable outputs are compared, not reports: none drawn (execution.report)
SETTINGS = {"search.mode": "sync", "search.total_archs": 4, "execution.slots_per_device": 2, "execution.report": False}


def _run(runs: Path, env: dict, faults: list[str], log: Path) -> int | None:
    return finish(pipeline_process(tiny_args("k", runs, **SETTINGS), {**env, "NASFCOS_FAULT": ";".join(faults)}, log), 600)


def test_a_pipeline_killed_inside_every_stage_writes_the_files_of_an_uninterrupted_one(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    # the uninterrupted reference runs beside the killed chain (its own run directory), a
    # file for its output: a full pipe would stall it
    with open(tmp_path / "ref.log", "w") as ref_log:
        ref = subprocess.Popen(
            [sys.executable, "-m", "flows.nas_search", *tiny_args("k", tmp_path / "ref", **SETTINGS)], cwd=ROOT,
            env={**env, "NASFCOS_FAULT": ";".join(_first(0, tmp_path / "ref.gate"))}, stdout=ref_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    runs, log = tmp_path / "killed", tmp_path / "killed.log"
    try:
        for stage, point in KILLS:
            code = _run(runs, env, [*_first(1, tmp_path / "killed.gate"), f"{point}=kill"], log)
            assert code == -9, (stage, code, log.read_text()[-3000:])
            assert not (runs / "k" / "manifests" / f"{stage}.json").exists(), f"{stage} finished before the kill at {point}"
        assert _run(runs, env, _first(1, tmp_path / "killed.gate"), log) == 0, log.read_text()[-3000:]
        ref.wait(timeout=600)
    finally:
        if ref.poll() is None:
            ref.kill()
    assert ref.returncode == 0, (tmp_path / "ref.log").read_text()[-3000:]

    a, b = tmp_path / "ref" / "k", runs / "k"
    first = {run: [line.split()[1] for line in (run / "evaluations.log").read_text().splitlines()] for run in (a, b)}
    assert first[a][:2] == first[b][:2][::-1], f"the slots did not finish in opposite orders: {first}"
    assert len(first[b]) == len(set(first[b])) == 4  # no arch evaluated twice across six kills
    orphans = [p for p in b.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]
    assert not orphans and not list((b / "results.parts").glob("*.parquet")), orphans
    assert not (b / "quarantine").exists()
    assert not (a / "report").exists() and not (b / "report").exists()  # execution.report: false drew nothing
    fa, fb = run_files(a), run_files(b)
    assert sorted(fa) == sorted(fb)
    assert {"backbone/checkpoint.pt", "results.parquet", "top_k.parquet", "leaderboard.parquet"} <= set(fa) and any(k.startswith("features.zarr/") for k in fa)
    assert any(k.startswith("full/") and k.endswith("checkpoint.pt") for k in fa) and len(pd.read_parquet(a / "leaderboard.parquet")) >= 2
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, f"{len(differ)} files differ between the killed and the uninterrupted run: {differ[:8]}"


@pytest.mark.parametrize("stage, point", KILLS)
def test_each_kill_point_is_inside_its_stage(stage, point):
    """The points exist where the matrix says (a renamed point would make a kill a no-op)."""
    name = point.split("#")[0]
    sources = {
        "train:checkpointed": "nasfcos/engine/train.py", "materialise:shard": "flows/materialise.py", "search:row": "flows/search.py",
        "select:written": "flows/select.py", "evaluate:arch": "flows/evaluate.py",
    }  # fmt: skip
    assert f'fault_point("{name}")' in (ROOT / sources[name]).read_text()
