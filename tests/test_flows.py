"""The Prefect pipeline on a test server: all six stages, skipping, SIGKILL + resume, Dask."""

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import finish, pipeline_process, tiny, tiny_args

from nasfcos.search.state import loop_state
from storage.curves import read_curves

pytest.importorskip("prefect")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(prefect_server, tmp_path_factory):
    from flows.nas_search import nas_search

    runs = tmp_path_factory.mktemp("runs")
    umask = os.umask(0o022)  # a shared machine's usual umask: the team may read a run
    try:
        state = nas_search(config="tiny", overrides=tiny("t1", runs), return_state=True)
    finally:
        os.umask(umask)
    return state, runs / "t1", tiny("t1", runs)


def _searched(run):
    """The leaderboard's searched archs (the baseline rows left out), best AP first."""
    board = pd.read_parquet(run / "leaderboard.parquet")
    return board[board.kind == "searched"]


def test_pipeline_runs_all_six_stages(finished_run):
    state, run, _ = finished_run
    assert state.is_completed(), state
    for name in ("results.parquet", "top_k.parquet", "leaderboard.parquet", "controller.pt", "features.zarr", "backbone/checkpoint.pt"):
        assert (run / name).exists(), name
    results = pd.read_parquet(run / "results.parquet")
    assert len(results) == results.arch_id.nunique() == 4
    board = pd.read_parquet(run / "leaderboard.parquet")
    assert sorted(board.kind) == ["baseline", "searched"] and {"AP", "AP50", "proxy_reward", "params", "macs"} <= set(board.columns)
    for arch_id in board.arch_id:
        assert (run / "full" / arch_id / "val_metrics.json").exists()
        curves = read_curves(run / "full" / arch_id)  # its TensorBoard files: the loss as it trained, the AP once evaluated
        assert curves["loss/total"][-1][0] == 2 and curves["val/AP"] == [(2, pytest.approx(board.set_index("arch_id").AP[arch_id], rel=1e-5, abs=1e-7))]
        card = (run / "full" / arch_id / "MODEL.md").read_text()  # the model card of every trained arch
        assert card.startswith(f"# `{arch_id}`") and "| `fpn-fcos` | baseline |" in card and "nasfcos.load(" in card and "GMACs" in card
        assert "](detections.jpg)" in card and (run / "full" / arch_id / "detections.jpg").stat().st_size > 0  # a few val images drawn
    # the report leads with the result: the leaderboard, then the best arch and its detections
    page = (run / "report" / "report.html").read_text()
    assert page.index("Leaderboard") < page.index('id="detections"') < page.index("<h2>Search</h2>") < page.index("<details><summary>Config")
    # the baseline: trained with the same budget, scored on the proxy as the search scores an arch
    base = board[board.kind == "baseline"].iloc[0]
    assert base.arch_id == "fpn-fcos" and base.arch == "fpn=fcos;head=fcos;share=0" and np.isfinite(base.proxy_reward) and base.params > 0
    assert torch.load(run / "full" / "fpn-fcos" / "checkpoint.pt", weights_only=False)["iteration"] == 2
    for stage in ("finetune-backbone", "materialise-features", "search", "select-top-k", "train-full", "evaluate"):
        assert (run / "manifests" / f"{stage}.json").exists(), stage


def test_an_export_of_a_trained_arch_carries_its_card_and_detections(finished_run, tmp_path):
    """`nasfcos export` of a leaderboard row: the evaluate stage's MODEL.md (and the picture it
    shows) plus what the folder holds; the folder predicts without the run."""
    import nasfcos
    from nasfcos.export import export

    _, run, _ = finished_run
    arch_id = pd.read_parquet(run / "leaderboard.parquet").arch_id.iloc[0]
    out = export(run / "full" / arch_id, tmp_path / "exported")
    card = (out / "MODEL.md").read_text()
    stage_card = (run / "full" / arch_id / "MODEL.md").read_text()
    assert card.startswith(stage_card.split("## How to load it")[0].rstrip()) and "## This folder (`nasfcos export`)" in card
    assert "--checkpoint <this folder>" in stage_card and "--checkpoint <this folder>" not in card  # the folder's how-to, not the run's
    with pytest.raises(ValueError, match="a training folder .* export into a folder of its own"):
        export(run / "full" / arch_id, run / "full" / arch_id)
    assert (out / "detections.jpg").read_bytes() == (run / "full" / arch_id / "detections.jpg").read_bytes()
    assert len(nasfcos.load(out)([torch.zeros(3, 64, 80, dtype=torch.uint8)] * 2)) == 2


def test_every_file_of_a_run_is_readable_by_the_team(finished_run):
    """Under umask 022 every file the pipeline wrote (atomic writes included, whose temp
    files are created 0600) is readable by group and others."""
    _, run, _ = finished_run
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 20 and {"results.parquet", "top_k.parquet", "leaderboard.parquet", "checkpoint.pt", "controller.pt"} <= {p.name for p in files}
    hidden = [str(p.relative_to(run)) for p in files if p.stat().st_mode & 0o044 != 0o044]
    assert not hidden, hidden


def test_long_stages_show_progress_artifacts(finished_run):
    """Materialise and train-full publish progress artifacts in the Prefect UI, as the search does."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        for key in ("t1-features-progress", "t1-train-full-progress", "t1-search-progress"):
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            assert arts and arts[0].type == "progress" and float(arts[0].data) == 100.0, (key, arts)


def test_rerun_skips_every_stage(finished_run):
    from flows.nas_search import nas_search

    _, run, overrides = finished_run
    before = {p.name: p.read_text() for p in (run / "manifests").iterdir()}
    log_before = (run / "evaluations.log").read_text()
    t = time.perf_counter()
    state = nas_search(config="tiny", overrides=overrides, return_state=True)
    assert state.is_completed()
    assert {p.name: p.read_text() for p in (run / "manifests").iterdir()} == before  # nothing re-finished
    assert (run / "evaluations.log").read_text() == log_before  # no decoder trained again
    assert time.perf_counter() - t < 60


def _copy_run(finished_run, runs):
    """A copy of the finished run (same run_id) under ``runs``; its overrides point there."""
    _, run, overrides = finished_run
    shutil.copytree(run, runs / run.name)
    return runs / run.name, {**overrides, "runs_dir": str(runs)}


def _mtimes(run):
    """Every file's mtime but the run lock's and the epochs' (each run of the pipeline takes one)."""
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "run.lock" and p.parent.name != "epochs"}


def test_changed_search_settings_rerun_only_from_search(finished_run, tmp_path):
    """A bigger search budget keeps finetuning and features, resumes the search from its files."""
    from flows.nas_search import nas_search

    run, overrides = _copy_run(finished_run, tmp_path)
    finetune_manifest = (run / "manifests" / "finetune-backbone.json").read_text()
    state = nas_search(config="tiny", overrides={**overrides, "search.total_archs": 6}, return_state=True)
    assert state.is_completed()
    assert (run / "manifests" / "finetune-backbone.json").read_text() == finetune_manifest
    ids = [line.split()[1] for line in (run / "evaluations.log").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6  # 4 earlier + 2 new, none twice
    assert len(pd.read_parquet(run / "results.parquet")) == 6


def test_tuning_changes_keep_a_finished_run_finished(finished_run, tmp_path):
    """Today's failure: evaluate.batch_size=2 on a finished run was refused ("files from
    another config"). Tuning fields are in no stage's identity: nothing re-runs."""
    from pydantic import BaseModel

    from flows.config import ROLES, PipelineConfig, role
    from flows.nas_search import nas_search

    sections = [f.annotation for f in PipelineConfig.model_fields.values() if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]
    assert len(sections) == 9
    for cls in sections:  # every field of every section says what it is to a run
        assert all(role(cls, k) in ROLES for k in cls.model_fields), [k for k in cls.model_fields if role(cls, k) not in ROLES]
    run, overrides = _copy_run(finished_run, tmp_path)
    before = _mtimes(run)
    tuned = {
        "evaluate.batch_size": 2, "features.batch_size": 3, "finetune.num_workers": 1, "train_full.num_workers": 1,
        "finetune.checkpoint_every": 3, "train_full.checkpoint_every": 5, "execution.retries": 2,
    }  # fmt: skip
    state = nas_search(config="tiny", overrides={**overrides, **tuned}, return_state=True)
    assert state.is_completed(), state.message
    after = _mtimes(run)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}  # nothing re-ran or changed


def test_top_k_and_num_archs_grow_and_shrink_keeping_trained_archs(finished_run, tmp_path):
    from flows.nas_search import nas_search

    run, overrides = _copy_run(finished_run, tmp_path)
    first = _searched(run).arch_id.iloc[0]
    # its files but MODEL.md (a view of the leaderboard, which changes: written again when its text does)
    kept = {k: v for k, v in _mtimes(run).items() if k.startswith(f"full/{first}/") and not k.endswith("/MODEL.md")}
    state = nas_search(config="tiny", overrides={**overrides, "select.top_k": 3, "train_full.num_archs": 2}, return_state=True)
    assert state.is_completed(), state.message
    assert len(pd.read_parquet(run / "top_k.parquet")) == 3
    board = _searched(run)
    assert len(board) == 2 and first in set(board.arch_id)
    assert {k: v for k, v in _mtimes(run).items() if k in kept} == kept  # neither retrained nor re-evaluated
    state = nas_search(config="tiny", overrides={**overrides, "select.top_k": 2, "train_full.num_archs": 1}, return_state=True)
    assert state.is_completed(), state.message
    assert _searched(run).arch_id.tolist() == [first]


def test_search_loads_streamed_features_from_a_node_local_copy(finished_run, tmp_path):
    """execution.stage_features + feature_residency=host: the splits come from this
    machine's copy of the store, stay in host memory, and equal the resident ones."""
    import torch

    from flows import feature_cache

    _, run, _ = finished_run
    resident = feature_cache._load_splits((str(run / "features.zarr"), "cpu", None, "device", None))
    streamed = feature_cache._load_splits((str(run / "features.zarr"), "cpu", None, "host", str(tmp_path / "local")))
    copies = [p for p in (tmp_path / "local").iterdir() if p.is_dir()]
    assert len(copies) == 1 and copies[0].name.startswith("features.zarr-")
    assert resident[2] == streamed[2]
    for a, b in zip(resident[:2], streamed[:2], strict=True):
        assert not a.stream and b.stream
        assert all(torch.equal(x, y) for x, y in zip(a.feats, b.feats, strict=True)) and torch.equal(a.assigned.ltrb, b.assigned.ltrb)


def test_finetune_trains_data_parallel_over_the_cpu_devices(prefect_server, tmp_path):
    """finetune.devices 2 on execution.devices [cpu, cpu] (the demo's): two ranks finetune
    the backbone, the global batch unchanged (nasfcos/engine/distributed.py)."""
    from flows.config import load_config
    from flows.finetune import finetune_backbone
    from nasfcos.engine.checkpoint import load_checkpoint

    cfg = load_config("tiny", tiny("dp", tmp_path, **{"execution.devices": ["cpu", "cpu"], "finetune.devices": 2}))
    finetune_backbone(cfg.model_dump(mode="json"))
    ckpt = load_checkpoint(tmp_path / "dp" / "backbone" / "checkpoint.pt")
    assert (ckpt["world_size"], ckpt["iteration"]) == (2, cfg.finetune.iterations)


def test_sigkilled_search_resumes_without_evaluating_twice(finished_run, tmp_path):
    """The async search of a pipeline process SIGKILLed once 2 of its 6 archs are durable;
    the next process evaluates the other 4, none twice (upstream stages: a finished run's)."""
    from prefect.settings import PREFECT_API_URL

    from storage.results import ResultsTable

    _copy_upstream(finished_run[1], tmp_path / "killed")
    args = tiny_args("killed", tmp_path, **{"search.total_archs": 6, "search.archs_per_step": 2, "execution.report": False})
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = pipeline_process(args, env, tmp_path / "killed.log")
    deadline = time.time() + 240
    while time.time() < deadline and proc.is_alive():  # kill once 2 results are durable
        if (tmp_path / "killed" / "results.parts").exists() and len(ResultsTable(tmp_path / "killed").read()) >= 2:
            break
        time.sleep(0.2)
    assert proc.is_alive(), "the search finished before it could be killed"
    proc.kill()
    proc.join()
    done_before = len(ResultsTable(tmp_path / "killed").read())
    assert 2 <= done_before < 6
    assert finish(pipeline_process(args, env, tmp_path / "resumed.log"), 600) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    ids = [line.split()[1] for line in (tmp_path / "killed" / "evaluations.log").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6  # every arch trained exactly once across the kill
    df = pd.read_parquet(tmp_path / "killed" / "results.parquet")
    assert sorted(df.arch_id) == sorted(ids)


def _copy_upstream(run, copy):
    """A new run dir holding ``run``'s finished finetune and materialise stages (the search's inputs)."""
    copy.mkdir()
    for name in ("backbone", "features.zarr", "data"):
        shutil.copytree(run / name, copy / name)
    (copy / "manifests").mkdir()
    for stage in ("finetune-backbone", "materialise-features"):
        shutil.copy(run / "manifests" / f"{stage}.json", copy / "manifests")
    return copy


def _search_on_copy(finished_run, tmp_path, run_id, settings):
    """The search stage alone, on two cpu slots (unless ``settings`` say otherwise), in a copy of ``finished_run``'s upstream stages."""
    from flows.config import load_config
    from flows.placement import task_runner
    from flows.search import search

    _, run, overrides = finished_run
    copy = _copy_upstream(run, tmp_path / run_id)
    cfg = load_config("tiny", {**overrides, "run_id": run_id, "runs_dir": str(tmp_path), "execution.devices": ["cpu", "cpu"], **settings})
    return copy, search.with_options(task_runner=task_runner(cfg))(cfg.model_dump(mode="json"))


def test_dask_local_cluster_evaluates_a_search_step(finished_run, tmp_path):
    pytest.importorskip("prefect_dask")

    # one device, one worker process (a worker per device: tests/test_placement.py)
    settings = {"search.total_archs": 2, "execution.task_runner": "dask", "execution.devices": ["cpu"]}
    copy, out = _search_on_copy(finished_run, tmp_path, "dask", settings)
    assert out["unique_archs"] == 2
    lines = (copy / "evaluations.log").read_text().splitlines()
    pids = {line.split("pid=")[1] for line in lines}
    assert len(lines) == 2 and str(os.getpid()) not in pids  # evaluated in a Dask worker process


def test_async_search_flow_evaluates_each_arch_once(finished_run, tmp_path):
    """search.mode async on the thread runner: 2 slots, a task submitted per freed slot."""

    copy, out = _search_on_copy(finished_run, tmp_path, "async", {"search.total_archs": 3, "search.mode": "async"})
    assert out["unique_archs"] == 3
    ids = [line.split()[1] for line in (copy / "evaluations.log").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 3 and sorted(ids) == sorted(pd.read_parquet(copy / "results.parquet").arch_id)
    state = loop_state(copy / "controller.pt")
    assert state["in_flight"] == state["finished"] == [] and len(state["stats"]) == 2  # K=2, then the last 1


# ---------------------------------------------------------------- failure classes


def _fake_evaluate(calls, raise_for):
    """nasfcos.engine.proxy.evaluate_arch stand-in: ``raise_for(arch_id, attempt)`` returns an
    exception to raise or None (then an ok record)."""
    from datetime import datetime, timezone

    from nasfcos.arch import resolve

    def evaluate(arch, train, val, *, num_classes, cfg, device_shared=False, **_):
        a = resolve(arch)
        calls[a.arch_id] = calls.get(a.arch_id, 0) + 1
        error = raise_for(a.arch_id, calls[a.arch_id])
        if error is not None:
            raise error
        now = datetime.now(timezone.utc)
        return {
            "arch_id": a.arch_id, "arch": str(a), "status": "ok", "reward": -1.0 - int(a.arch_id[:3], 16) / 1e4, "loss_cls": 0.5,
            "loss_reg": 0.3, "loss_ctr": 0.2, "params": 1, "macs": 1, "train_seconds": 0.0, "eval_seconds": 0.0,
            "peak_mem_mb": 0.0, "device": "cpu", "seed": 0, "error": "", "started_at": now, "finished_at": now,
        }  # fmt: skip

    return evaluate


def test_search_task_retries_an_infrastructure_failure_and_records_the_arch_once(finished_run, tmp_path, monkeypatch):
    """Today's failure: a CUDA error became a permanent 'failed' row with reward -10 and
    Prefect's retries never fired. Now the task raises, Prefect retries it, the row is ok."""
    import nasfcos.engine.proxy

    calls = {}
    monkeypatch.setattr(
        nasfcos.engine.proxy, "evaluate_arch", _fake_evaluate(calls, lambda aid, n: RuntimeError("CUDA error: an illegal memory access was encountered") if n == 1 else None)
    )
    copy, out = _search_on_copy(finished_run, tmp_path, "retried", {"search.total_archs": 3, "execution.retry_delay_s": 0})
    df = pd.read_parquet(copy / "results.parquet")
    assert out["unique_archs"] == 3 and (df.status == "ok").all() and (df.reward > -10).all()
    assert set(calls.values()) == {2}  # each arch: the failed attempt, then Prefect's retry
    ids = [line.split()[1] for line in (copy / "evaluations.log").read_text().splitlines()]
    assert sorted(ids) == sorted(df.arch_id)


def test_a_search_that_only_fails_stops_with_an_error_and_select_refuses_empty_results(finished_run, tmp_path, monkeypatch):
    """Today's failure: every evaluation failing ended Completed with an empty top-k."""
    import nasfcos.engine.proxy
    from flows.config import load_config
    from flows.select import select_top_k

    monkeypatch.setattr(nasfcos.engine.proxy, "evaluate_arch", _fake_evaluate({}, lambda aid, n: OSError(5, "Input/output error")))
    with pytest.raises(
        Exception, match=r"search stopped: every worker is drained \(.*cpu\); \d+ evaluations in a row failed.* \(last: \w+: (OSError|InfrastructureError: every device)"
    ):
        _search_on_copy(finished_run, tmp_path, "broken", {"search.total_archs": 4, "execution.retries": 0, "search.max_consecutive_failures": 3})
    assert not (tmp_path / "broken" / "results.parquet").exists() or len(pd.read_parquet(tmp_path / "broken" / "results.parquet")) == 0
    _, _, overrides = finished_run
    cfg = load_config("tiny", {**overrides, "run_id": "broken", "runs_dir": str(tmp_path)})
    state = select_top_k(cfg.model_dump(mode="json"), return_state=True)
    assert state.is_failed() and "no architecture succeeded" in state.message, state.message


def test_one_diverging_arch_gets_a_failed_leaderboard_row_and_the_others_finish(finished_run, tmp_path, monkeypatch):
    """Today's failure: one diverging arch failed train-full on every rerun."""
    import nasfcos.engine.distributed
    from flows.nas_search import nas_search

    run, overrides = _copy_run(finished_run, tmp_path)
    first = _searched(run).arch_id.iloc[0]
    real = nasfcos.engine.distributed.train_on_devices

    def diverging(spec, dataset, cfg, out_dir, **kw):
        if out_dir.name not in (first, "fpn-fcos"):
            raise FloatingPointError("non-finite loss at iteration 1: cls=nan")
        return real(spec, dataset, cfg, out_dir, **kw)

    monkeypatch.setattr(nasfcos.engine.distributed, "train_on_devices", diverging)
    state = nas_search(config="tiny", overrides={**overrides, "train_full.num_archs": 2}, return_state=True)
    assert state.is_completed(), state.message
    board = _searched(run)
    assert board.status.tolist() == ["ok", "failed"] and board.arch_id.iloc[0] == first
    assert board.AP.notna().tolist() == [True, False] and "FloatingPointError: non-finite loss" in board.error.iloc[1]


def test_a_rank_out_of_memory_gives_a_failed_row_and_the_stage_completes(finished_run, tmp_path, monkeypatch):
    """Today's failure: a rank's out-of-memory error came back as RuntimeError('rank 1 failed:
    OutOfMemoryError...'), not the arch's, and failed train-full on every rerun. Each arch
    trains on 2 gloo ranks through torchrun; rank 1 of the arch trained fresh runs out of
    memory at its first iteration (the others are recorded trained: no group starts for them)."""
    from flows.nas_search import nas_search

    run, overrides = _copy_run(finished_run, tmp_path)
    first = _searched(run).arch_id.iloc[0]
    monkeypatch.setenv("NASFCOS_FAULT", "train:*:1:rank1=oom:CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
    # no restart of the group (tests/test_distributed.py has the restart that stops on the record)
    grouped = {**overrides, "train_full.num_archs": 2, "execution.devices": ["cpu", "cpu"], "train_full.devices_per_arch": 2, "execution.max_restarts": 0}
    state = nas_search(config="tiny", overrides=grouped, return_state=True)
    assert state.is_completed(), state.message
    board = _searched(run)
    assert board.status.tolist() == ["ok", "failed"] and board.arch_id.iloc[0] == first
    assert board.error.iloc[1].startswith("OutOfMemoryError: rank 1 (") and "Tried to allocate 2.00 GiB (fake)" in board.error.iloc[1]


def test_a_damaged_feature_chunk_is_named_and_the_next_materialise_repairs_it(finished_run, tmp_path):
    """Today's failure: 'error during blosc decompression: -1' naming no array, and the
    shard stayed done so materialising again could not repair it."""
    import numpy as np

    from flows.config import load_config
    from flows.materialise import materialise_features
    from storage.features import DamagedShard, FeatureStore

    run, overrides = _copy_run(finished_run, tmp_path)
    before = FeatureStore.open(run / "features.zarr").read_split("meta_train")["features"]["C3"]
    chunk = sorted((run / "features.zarr" / "meta_train" / "C3").rglob("c/*/*/*/*"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(DamagedShard, match=r"meta_train.*C3 shard 0 .*marked not done: run materialise again"):
        FeatureStore.open(run / "features.zarr").read_split("meta_train")
    cfg = load_config("tiny", overrides)
    out = materialise_features(cfg.model_dump(mode="json"))
    assert out["shards_written"] == 1  # the manifest said done; the damaged shard is recomputed
    after = FeatureStore.open(run / "features.zarr").read_split("meta_train")["features"]["C3"]
    assert np.array_equal(before, after)


def test_a_retried_evaluation_returns_the_durable_row_instead_of_training_again(finished_run, tmp_path, monkeypatch):
    """Today's failure: a task that failed after its row was durable trained the arch again on retry."""
    import nasfcos.engine.proxy
    from storage.results import ResultsTable

    calls, failed_once = {}, set()
    monkeypatch.setattr(nasfcos.engine.proxy, "evaluate_arch", _fake_evaluate(calls, lambda aid, n: None))
    real = ResultsTable.write_part

    def write_then_fail(self, rows):
        n = real(self, rows)
        if rows[0]["arch_id"] not in failed_once:  # the row is durable, then the disk/network fails
            failed_once.add(rows[0]["arch_id"])
            raise OSError(5, "Input/output error")
        return n

    monkeypatch.setattr(ResultsTable, "write_part", write_then_fail)
    copy, out = _search_on_copy(finished_run, tmp_path, "durable", {"search.total_archs": 2, "execution.retry_delay_s": 0})
    assert out["unique_archs"] == 2 and len(failed_once) == 2
    assert set(calls.values()) == {1}  # each arch trained once; the retry found its row


# ---------------------------------------------------------------- plots and the report


def _png_artifacts(key: str) -> list[str]:
    """The markdown of every version of the artifact ``key`` (newest first)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC)
    assert arts and all(a.type == "markdown" for a in arts), (key, arts)
    return [a.data for a in arts]


def test_stage_summaries_in_the_prefect_api_carry_their_plots(finished_run):
    """The summary artifacts of search, select, train-full and evaluate embed PNGs as data
    URIs (the UI shows them), each one not blank; the run's report holds the same plots."""
    import base64
    import io
    import re

    import numpy as np
    from helpers import check_report
    from PIL import Image

    from flows.report.page import STAGE_PLOTS

    _, run, _ = finished_run
    required = {"search": {"reward", "choices", "complexity", "best_arch"}, "select-top-k": {"complexity", "best_arch"},
                "train-full": {"complexity"}, "evaluate": {"proxy_vs_ap"}}  # fmt: skip
    for stage, names in required.items():
        markdown = _png_artifacts(f"t1-{stage.removesuffix('-top-k')}")[0]
        images = re.findall(r"!\[(\w+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
        assert names <= {name for name, _ in images} <= set(STAGE_PLOTS[stage]), (stage, [name for name, _ in images])
        for name, data in images:
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=float)
            assert pixels.var() > 0, (stage, name)
    assert "archs/hour" in _png_artifacts("t1-search")[0]
    page = check_report(run)  # what the stages left in runs/<id>/report/
    assert {"reward", "choices", "complexity", "proxy_vs_ap", "best_arch"} <= set(page.images)


def test_search_redraws_its_plots_every_plot_every_steps(finished_run, tmp_path, monkeypatch):
    import nasfcos.engine.proxy

    monkeypatch.setattr(nasfcos.engine.proxy, "evaluate_arch", _fake_evaluate({}, lambda aid, n: None))  # instant evaluations
    _search_on_copy(finished_run, tmp_path, "plotted", {"search.total_archs": 2, "search.archs_per_step": 2, "search.plot_every": 1})
    versions = _png_artifacts("plotted-search")
    assert len(versions) >= 2 and "(running, step 1)" in versions[-1] and "data:image/png;base64," in versions[-1]
    assert "search finished" in versions[0] and (tmp_path / "plotted" / "report" / "report.html").exists()


def test_search_strategies_run_in_the_flow(finished_run, tmp_path, monkeypatch):
    """Evolution warm-started from the finished run's results, successive halving over 1 and 2
    proxy epochs (promoted archs resume from the state storage kept), a MACs limit and a
    restricted op set (search.ops), in the search stage on two cpu slots."""
    import torch

    from flows.config import load_config
    from flows.search import _cost
    from nasfcos.arch import Arch
    from storage.run_dir import RunDir

    _, run, overrides = finished_run
    price = _cost(load_config("tiny", overrides), RunDir(run))
    limit = sorted(price(a)[1] for a in pd.read_parquet(run / "results.parquet").arch)[-1]  # the finished run's archs fit
    settings = {
        "search.policy": "evolution", "search.population": 4, "search.sample_size": 2, "search.warm_start": str(run / "results.parquet"),
        "search.rungs": [1, 2], "proxy.epochs": 2, "search.total_archs": 4, "search.mode": "async", "search.max_decoder_macs": limit,
        "search.ops": ["sep_conv_3x3", "skip_connect", "conv1x1", "conv3x3"],
    }  # fmt: skip
    from storage.rung_states import RungStates

    reads, read = [], RungStates.read
    monkeypatch.setattr(RungStates, "read", lambda self, *a: reads.append(read(self, *a)) or reads[-1])
    copy, out = _search_on_copy(finished_run, tmp_path, "strategies", settings)
    df = pd.read_parquet(copy / "results.parquet")
    evaluated = df[df.status != "over_budget"]
    assert out["unique_archs"] == len(evaluated) == 4 and (evaluated.status == "ok").all(), df.error.tolist()
    assert all(price(Arch.parse(a))[1] <= limit for a in evaluated.arch)
    assert (df[df.status == "over_budget"].macs > limit).all()
    used = {op for ops in (*df.fpn_ops, *df.head_ops) for op in ops}
    assert used <= {"sep_conv_3x3", "skip_connect", "conv1x1", "conv3x3"}, used  # search.ops reached the policy
    n_over = int((df.status == "over_budget").sum())
    assert f"; {n_over} over the MACs {limit:,} limit, never evaluated" in _png_artifacts("strategies-search")[0]
    log = [line.split() for line in (copy / "evaluations.log").read_text().splitlines()]
    assert sorted((x[1], x[-1]) for x in log) == sorted((a, f"epochs={e}") for a, r in zip(evaluated.arch_id, evaluated.rung_epochs, strict=True) for e in r)
    promoted = evaluated[evaluated.rung_epochs.map(len) == 2]
    # floor(n/3) = 1 of the first 3 or 4 went on to 2 epochs; asynchronous promotion (ASHA) may
    # also promote the 4th when it beats the one promoted before it finished
    assert 1 <= len(promoted) <= 2 and (promoted.reward_used == promoted.rung_rewards.map(lambda r: r[1])).all()
    assert len(reads) == len(promoted) and all(reads)  # each promotion resumed from its 1-epoch state
    assert not (copy / "rungs").exists()  # the states are dropped when the search ends
    state = torch.load(copy / "controller.pt", weights_only=True)["policy"]
    assert state["kind"] == "evolution" and len(state["members"]) == 4
