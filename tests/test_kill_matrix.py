"""The kill matrix: the real pipeline process (``python -m flows.nas_search``) SIGKILLed once
inside each of the six stages, each time resumed by the next process, ends with the same
durable outputs as an uninterrupted run of the same config and seed (sync search)."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import tiny

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


def _args(runs: Path) -> list[str]:
    args = [sys.executable, "-m", "flows.nas_search", "--config", "tiny"]
    # durable outputs are compared, not reports: none drawn (execution.report)
    for k, v in tiny("k", runs, **{"search.mode": "sync", "search.total_archs": 4, "execution.report": False}).items():
        args += ["--set", f"{k}={v}"]
    return args


def _run(runs: Path, env: dict, fault: str | None = None) -> subprocess.CompletedProcess:
    e = {**env, "NASFCOS_FAULT": f"{fault}=kill"} if fault else env
    return subprocess.run(_args(runs), cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)


def _model(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {"iteration": ckpt["iteration"], **ckpt["model"]}


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_a_pipeline_killed_inside_every_stage_ends_as_an_uninterrupted_one(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from storage.features import FeatureStore

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    # the uninterrupted reference runs beside the killed chain (its own run directory)
    ref_log = open(tmp_path / "ref.log", "w")  # a file, not a pipe: a full pipe would stall it
    ref = subprocess.Popen(_args(tmp_path / "ref"), cwd=ROOT, env=env, stdout=ref_log, stderr=subprocess.STDOUT)
    runs = tmp_path / "killed"
    for stage, point in KILLS:
        p = _run(runs, env, point)
        assert p.returncode == -9, (stage, p.returncode, p.stderr[-3000:])
        assert not (runs / "k" / "manifests" / f"{stage}.json").exists(), f"{stage} finished before the kill at {point}"
    last = _run(runs, env)
    assert last.returncode == 0, last.stderr[-3000:]
    ref.wait(timeout=600)
    ref_log.close()
    assert ref.returncode == 0, (tmp_path / "ref.log").read_text()[-3000:]

    a, b = tmp_path / "ref" / "k", runs / "k"
    assert _same_tensors(_model(a / "backbone/checkpoint.pt"), _model(b / "backbone/checkpoint.pt"))  # bit-identical
    fa, fb = FeatureStore.open(a / "features.zarr"), FeatureStore.open(b / "features.zarr")
    for split in ("meta_train", "meta_val"):
        da, db = fa.read_split(split), fb.read_split(split)
        assert all((da["features"][k] == db["features"][k]).all() for k in da["features"])
        assert all((x == y).all() for x, y in zip(da["boxes"], db["boxes"], strict=True))
    cols = ["arch_id", "step", "sample", "status", "reward"]
    ra, rb = pd.read_parquet(a / "results.parquet")[cols], pd.read_parquet(b / "results.parquet")[cols]
    pd.testing.assert_frame_equal(ra, rb)  # the same archs with the same rewards
    ids = [line.split()[1] for line in (b / "evaluations.log").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 4  # no arch evaluated twice across six kills
    assert pd.read_parquet(a / "top_k.parquet").arch_id.tolist() == pd.read_parquet(b / "top_k.parquet").arch_id.tolist()
    trained = pd.read_parquet(a / "leaderboard.parquet").arch_id.tolist()
    for arch in trained:
        assert _same_tensors(_model(a / "full" / arch / "checkpoint.pt"), _model(b / "full" / arch / "checkpoint.pt"))
    cols = ["arch_id", "AP", "AP50", "status"]
    pd.testing.assert_frame_equal(pd.read_parquet(a / "leaderboard.parquet")[cols], pd.read_parquet(b / "leaderboard.parquet")[cols])
    orphans = [p for p in b.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]
    assert not orphans and not list((b / "results.parts").glob("*.parquet")), orphans
    assert not (b / "quarantine").exists()
    assert not (a / "report").exists() and not (b / "report").exists()  # execution.report: false drew nothing


@pytest.mark.parametrize("stage, point", KILLS)
def test_each_kill_point_is_inside_its_stage(stage, point):
    """The points exist where the matrix says (a renamed point would make a kill a no-op)."""
    name = point.split("#")[0]
    sources = {
        "train:checkpointed": "nasfcos/engine/train.py", "materialise:shard": "flows/materialise.py", "search:row": "flows/search.py",
        "select:written": "flows/select.py", "evaluate:arch": "flows/evaluate.py",
    }  # fmt: skip
    assert f'fault_point("{name}")' in (ROOT / sources[name]).read_text()
