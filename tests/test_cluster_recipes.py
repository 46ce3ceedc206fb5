"""The cluster recipes of deployments/cluster.py (issue #27), rendered: a SLURM job is one
worker on one GPU, a Kubernetes worker pod requests one nvidia.com/gpu; both declare the
GPU slots and a memory limit sized from the feature store."""

from __future__ import annotations

import importlib.util
import os
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


def test_the_train_arch_pool_renders_an_indexed_job_of_gpu_pods_meeting_at_pod_0():
    """The Kubernetes work pool of train-arch jobs (issue #29) through prefect-kubernetes'
    own rendering, as its worker renders a flow run's Job: one pod per node, each asking
    for its GPUs, pod 0 running the flow and the others a torchrun node, all meeting at
    pod 0's DNS name under the headless Service."""
    pytest.importorskip("prefect_kubernetes")
    import asyncio
    import json
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    pool = _load("train_pool", ROOT / "deployments" / "train_pool.py")
    for what, path in (("template", "train-arch-pool.json"), ("service", "train-arch-service.yaml")):
        rendered = subprocess.run([sys.executable, str(ROOT / "deployments" / "train_pool.py"), what], capture_output=True, text=True, check=True).stdout
        assert rendered == (ROOT / "deployments" / "k8s" / path).read_text(), f"deployments/k8s/{path}: render it again (python deployments/train_pool.py {what})"
    template = json.loads((ROOT / "deployments" / "k8s" / "train-arch-pool.json").read_text())
    values = {"image": "reg/nasfcos:1", "nodes": 2, "gpus_per_node": 8, "env": {"NASFCOS_JOB_FILE": "/runs/r/full/abc/job.pkl"}}
    job = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    job.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="train-abc"))
    m = job.job_manifest
    assert (m["spec"]["completionMode"], m["spec"]["completions"], m["spec"]["parallelism"], m["spec"]["backoffLimit"]) == ("Indexed", 2, 2, 0)
    pod = m["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert pod["subdomain"] == "nasfcos-train" and pool.POD_LABEL.items() <= m["spec"]["template"]["metadata"]["labels"].items()
    sh, dash_c, script, name = c["command"]
    assert (sh, dash_c, name) == ("/bin/sh", "-c", "sh")
    assert 'NASFCOS_NODES=2 NASFCOS_NPROC=8 NASFCOS_RDZV_ENDPOINT="$JOB_NAME-0.nasfcos-train:29400"' in script
    assert 'NASFCOS_RDZV_ID="$JOB_NAME"' in script  # every node's torchrun names one group
    assert 'if [ "$JOB_COMPLETION_INDEX" = 0 ]; then exec "$@"; else exec deployments/torchrun-node.sh; fi' in script
    assert c["args"][:3] == ["prefect", "flow-run", "execute"]  # pod 0's "$@": the flow run
    env = {e["name"]: e for e in c["env"]}
    assert env["NASFCOS_JOB_FILE"]["value"] == "/runs/r/full/abc/job.pkl" and "batch.kubernetes.io/job-name" in str(env["JOB_NAME"]["valueFrom"])
    assert {"name": "runs", "mountPath": "/runs"} in c["volumeMounts"] and pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "nasfcos-runs"}
    svc = yaml.safe_load((ROOT / "deployments" / "k8s" / "train-arch-service.yaml").read_text())
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == pool.POD_LABEL and svc["metadata"]["name"] == "nasfcos-train"


def _load(name: str, path: Path):
    s = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(s)
    s.loader.exec_module(module)
    return module


FAKE_SRUN = """#!/bin/bash
# srun as SLURM runs it: the command once per node of the allocation (SLURM_NODEID), all at once
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def test_the_slurm_recipe_trains_one_arch_on_two_nodes_through_srun(synthetic_small, tmp_path, monkeypatch):
    """deployments/slurm/train-arch.sbatch run as train-arch's launcher (``NASFCOS_LAUNCHER``,
    `sbatch --wait` on a cluster; here bash with a fake srun and scontrol): one torchrun per
    "node" meets at the first node and the weights equal one process's (1e-5)."""
    import socket

    import torch

    from nasfcos.data import COCODetection, build_transforms
    from nasfcos.engine.checkpoint import load_checkpoint
    from nasfcos.engine.distributed import train_on_devices
    from nasfcos.engine.train import TrainConfig, train
    from nasfcos.model.detector import DetectorSpec

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(ROOT),
           "NASFCOS_NPROC": "1", "NASFCOS_RDZV_PORT": str(port), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}  # fmt: skip
    spec = DetectorSpec(num_classes=3, backbone="tiny", width=32)
    cfg = TrainConfig(iterations=3, batch_size=4, base_lr=0.01, warmup_iters=1, steps=(2,), checkpoint_every=3, log_every=1, num_workers=0)
    tf = build_transforms(train=True, min_size=64, max_size=96, crop=64)
    ds = COCODetection(synthetic_small["train_json"], synthetic_small["image_root"], transforms=tf)
    one = load_checkpoint(train(spec, ds, cfg, tmp_path / "one").checkpoint)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # as a train-arch job passes them from NASFCOS_NODES and NASFCOS_LAUNCHER (sbatch --wait ... on a cluster)
    launcher = f"bash {ROOT / 'deployments' / 'slurm' / 'train-arch.sbatch'}"
    two = load_checkpoint(train_on_devices(spec, ds, cfg, tmp_path / "slurm", devices=["cpu"], nodes=2, launcher=launcher).checkpoint)
    assert (two["world_size"], two["iteration"]) == (2, 3)
    for k in one["model"]:
        assert torch.allclose(one["model"][k].float(), two["model"][k].float(), rtol=0, atol=1e-5), k
