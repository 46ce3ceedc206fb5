"""Workers fit for a cluster (issue #27): memory limits sized from the feature store, and
the checks of every worker (versions, code, devices, paths, resources, memory) that make a
worker unable to do the job one error naming it."""

from __future__ import annotations

import pytest
from helpers import tiny_feature_store

from flows import placement, workers
from flows.config import load_config

pytest.importorskip("distributed")


def test_a_local_clusters_memory_limit_is_sized_from_the_features(tmp_path, capfd, caplog):
    from flows.placement import task_runner
    from storage.features import FeatureStore

    run = tmp_path / "r"
    tiny_feature_store(run)
    store = FeatureStore.open(run / "features.zarr")
    n = placement.feature_bytes(run / "features.zarr")
    assert n == store.nbytes("meta_train") + store.nbytes("meta_val") > 0
    cfg = load_config("tiny", {"runs_dir": str(tmp_path), "run_id": "r", "execution.task_runner": "dask", "execution.devices": ["cpu", "cpu"]})
    assert task_runner(cfg).cluster_kwargs["memory_limit"] == placement.memory_limit(2, n) >= placement.memory_needed(n)
    fresh = load_config("tiny", {"runs_dir": str(tmp_path), "run_id": "new", "execution.task_runner": "dask"})
    assert task_runner(fresh).cluster_kwargs["memory_limit"] == "auto"  # no features yet (materialise-features' runner)
    # the paper's size: 50 GB of features, 8 workers on a 256 GB machine: each worker's share
    # (32 GB) is raised to what it needs, and a warning says the machine cannot hold them all
    capfd.readouterr()
    assert placement.memory_limit(8, 50 * 10**9, total=256 * 10**9) == 100 * 10**9 + placement.BASE_BYTES
    assert (
        "8 Dask workers x 104.3 GB (2 x 50.0 GB of proxy features + 4 GB) exceed this machine's 256.0 GB" in capfd.readouterr().err + caplog.text
    )  # where Prefect's logging sends it
    assert placement.memory_limit(8, 10**9, total=256 * 10**9) == 32 * 10**9  # the share suffices


def _facts(**over) -> dict:
    f = {"host": "n1", "versions": {"torch": "2.11", "nasfcos": "0.1"}, "code": "abc", "cuda_devices": 1, "gpu": "GPU-1", "paths": {"run": "ok", "features": "ok"}}
    return {**f, **over}


def test_each_workers_problem_is_one_line_naming_it():
    mine = _facts(gpu=None)
    seen = {
        "good": _facts(),
        "old": _facts(versions={"torch": "2.10", "nasfcos": "0.1"}, gpu="GPU-2"),
        "stale": _facts(code="def", gpu="GPU-3", host="n2"),
        "elsewhere": _facts(paths={"run": "missing", "features": "missing"}, host="n3"),
        "nogpu": _facts(gpu=None, cuda_devices=0, host="n4"),
        "twin": _facts(),  # the same GPU as "good" on n1: an --nworkers job without CUDA_VISIBLE_DEVICES
        "broken": RuntimeError("CUDA error: initialization error"),
    }
    info = {name: {"resources": {"GPU": 2}, "memory_limit": 0} for name in seen}
    info["twin"] = {"resources": {}, "memory_limit": 10**9}
    found = workers.problems(seen, info, mine, device="cuda", slots_per_device=2, need=5 * 10**9)
    assert found == [
        "Dask worker broken: its checks failed (RuntimeError: CUDA error: initialization error)",
        "Dask worker elsewhere on n3: features missing, run missing there (the run directory must be on storage every worker shares)",
        "Dask worker nogpu on n4: no CUDA device cuda (it sees 0)",
        "Dask worker old: other package versions than the flow's: torch 2.10 (flow: 2.11)",
        "Dask worker stale: other nasfcos code than the flow's (fingerprint def, flow abc): install the same commit on every machine",
        "Dask worker twin: memory limit 1.0 GB, the proxy features need 5.0 GB per worker (start it with --memory-limit 5GB or 0; below that Dask kills it on loading them, again and again)",
        "Dask workers good, twin on n1 all use GPU GPU-1: one worker per GPU (CUDA_VISIBLE_DEVICES per worker; see docs/operations.md, 'A cluster')",
    ]
    assert workers.problems({"good": _facts()}, {"good": info["good"]}, mine, device="cuda", slots_per_device=2, need=5 * 10**9) == []
    # a local cluster pins its workers itself: a GPU listed twice there is meant
    assert workers.problems({"a": _facts(), "b": _facts()}, {"a": info["good"], "b": info["good"]}, mine, device="cuda", slots_per_device=2, need=None, own_gpus=False) == []
    # workers of GPU=1 where a whole-device evaluation asks GPU=2: it would wait for ever
    one = {name: {"resources": {"GPU": 1}} for name in ("a", "b")}
    assert workers.problems({"a": _facts(), "b": _facts(gpu="GPU-2")}, one, mine, device="cuda", slots_per_device=2, need=None) == [
        "no Dask worker can run a whole-device task: it asks GPU=2 (execution.slots_per_device) of one worker, the workers declare a: GPU=1, b: GPU=1; "
        "start each worker with --resources GPU=2 or set execution.slots_per_device to what they declare"
    ]


def test_the_checks_run_on_every_worker_of_a_real_cluster(tmp_path):
    """client.run on each worker of a Dask cluster (in-process workers): the same code and
    versions as the flow, the run there; a memory limit under what the features need is named."""
    from distributed import Client, LocalCluster

    run = tmp_path / "r"
    tiny_feature_store(run)
    cfg = load_config("tiny", {"runs_dir": str(tmp_path), "run_id": "r", "execution.task_runner": "dask"})
    with LocalCluster(n_workers=2, processes=False, threads_per_worker=1, memory_limit="100MB", dashboard_address=None) as cluster, Client(cluster) as client:
        found = workers.check(client, cfg, run)
    need = placement.memory_needed(placement.feature_bytes(run / "features.zarr"))
    assert len(found) == 2 and all(f"memory limit 0.1 GB, the proxy features need {need / 1e9:.1f} GB" in p for p in found)
