"""The cluster recipes of deployments/cluster.py (issue #27), rendered: a SLURM job is one
worker on one GPU, a Kubernetes worker pod requests one nvidia.com/gpu; both declare the
GPU slots and a memory limit sized from the feature store."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import tiny_feature_store

from flows.placement import feature_bytes, memory_needed

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cluster_recipe", ROOT / "deployments" / "cluster.py")
cluster = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cluster)


def test_a_slurm_job_is_one_worker_on_one_gpu(tmp_path):
    pytest.importorskip("dask_jobqueue")
    tiny_feature_store(tmp_path / "r")
    memory = cluster.worker_memory(str(tmp_path / "r" / "features.zarr"), 64)
    assert memory == memory_needed(feature_bytes(tmp_path / "r" / "features.zarr"))
    c = cluster.slurm_cluster(slots=4, memory=memory, partition="gpu", account="proj", prologue=("source /shared/nasfcos/.venv/bin/activate",), host="127.0.0.1")
    try:
        script = c.job_script()
    finally:
        c.close()
    lines = script.splitlines()
    assert "#SBATCH --gres=gpu:1" in lines and "#SBATCH -p gpu" in lines and "#SBATCH -A proj" in lines
    worker = next(line for line in lines if "dask_worker" in line)
    assert "--nthreads 4" in worker and "--resources GPU=4" in worker and f"--memory-limit {-(-memory // 2**30)}.00GiB" in worker
    assert "--nworkers" not in worker  # one worker per job, so one per granted GPU
    assert lines.index("source /shared/nasfcos/.venv/bin/activate") < lines.index(worker)


def test_a_kubernetes_worker_requests_one_gpu_and_the_file_is_the_rendering():
    pytest.importorskip("dask_kubernetes")
    s = cluster.k8s_spec(gpus=16, slots=2, memory=100 * 2**30, image="reg/nasfcos:1", pvc="runs")
    (worker,) = s["spec"]["worker"]["spec"]["containers"]
    assert s["spec"]["worker"]["replicas"] == 16
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["limits"]["memory"] == "110Gi"
    args = worker["args"]
    assert args[args.index("--resources") + 1] == "GPU=2" and args[args.index("--nthreads") + 1] == "2" and args[args.index("--memory-limit") + 1] == "100GiB"
    assert worker["volumeMounts"] == [{"name": "runs", "mountPath": "/runs"}]
    (scheduler,) = s["spec"]["scheduler"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in str(scheduler["resources"])
    rendered = subprocess.run([sys.executable, str(ROOT / "deployments" / "cluster.py"), "k8s"], capture_output=True, text=True, check=True).stdout
    assert rendered == (ROOT / "deployments" / "dask-cluster.yaml").read_text(), "deployments/dask-cluster.yaml: render it again (python deployments/cluster.py k8s)"
    assert yaml.safe_load(rendered)["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
