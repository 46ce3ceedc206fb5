"""A Dask cluster of GPU workers for a search, one worker per GPU (issue #27).

Each worker owns one GPU (it sees it as ``cuda``), declares ``GPU=<slots>`` (the
evaluations it runs at once: ``execution.slots_per_device``) and a memory limit that holds
the proxy features (``flows.placement.memory_needed``). The search connects to it with
``execution.task_runner: dask``, ``execution.dask_address: <the address printed>``,
``execution.devices: [cuda]``; the run directory must be on storage every worker mounts.

    # SLURM (dask-jobqueue): one batch job per GPU, the scheduler in this process
    python deployments/cluster.py slurm --gpus 64 --slots 4 --features runs/paper/features.zarr \\
        --partition gpu --account myproj --walltime 7-00:00:00 --prologue 'source ~/nasfcos/.venv/bin/activate'
    python deployments/cluster.py slurm --gpus 8 --print      # the job script only

    # Kubernetes (dask-kubernetes operator): a DaskCluster resource
    python deployments/cluster.py k8s --gpus 64 --slots 4 --image registry/nasfcos:1.0 --pvc nasfcos-runs > cluster.yaml
    kubectl apply -f cluster.yaml   # scheduler at tcp://nasfcos-scheduler.<namespace>.svc:8786

``deployments/dask-cluster.yaml`` is the Kubernetes file this script renders with its
defaults (a test keeps them equal). See docs/operations.md, "A cluster".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
RUNS_MOUNT = "/runs"  # where the Kubernetes workers mount the shared runs volume


def worker_memory(features: str | None, default_gb: float) -> int:
    """Bytes each worker needs: from the feature store when it exists, else ``default_gb``."""
    from flows.placement import feature_bytes, memory_needed

    need = memory_needed(feature_bytes(features)) if features else None
    return need if need is not None else int(default_gb * GIB)


def slurm_cluster(*, slots: int, memory: int, partition: str | None = None, account: str | None = None, walltime: str = "7-00:00:00",
                  prologue: tuple[str, ...] = (), cpus: int | None = None, host: str | None = None):  # fmt: skip
    """A ``dask_jobqueue.SLURMCluster`` whose every job is one worker on one GPU: ``--gres=gpu:1``
    (SLURM sets ``CUDA_VISIBLE_DEVICES`` to the GPU it grants, so the worker's ``cuda`` is
    that GPU), one process with ``slots`` threads and ``GPU=slots``. One job per GPU rather
    than ``--nworkers 8`` in one job: eight workers of one job would all see every GPU of
    the node and all use GPU 0. Size it with ``cluster.adapt(minimum_jobs=N, maximum_jobs=N)``."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        queue=partition, account=account, walltime=walltime, processes=1, cores=slots, job_cpu=cpus or max(2 * slots, 4),
        memory=f"{-(-memory // GIB)}GiB", job_extra_directives=["--gres=gpu:1"], job_script_prologue=list(prologue),
        worker_extra_args=["--resources", f"GPU={slots}"], local_directory="${TMPDIR:-/tmp}", name="nasfcos",
        scheduler_options={"host": host} if host else None,
    )  # fmt: skip


def k8s_spec(*, gpus: int, slots: int, memory: int, image: str, pvc: str, name: str = "nasfcos") -> dict:
    """A ``DaskCluster`` resource (dask-kubernetes operator): ``gpus`` worker pods, each
    requesting one ``nvidia.com/gpu`` (the device plugin exposes only that GPU to the pod),
    ``slots`` threads and ``GPU=slots``, Dask's memory limit ``memory`` bytes (the pod's 10 % more), and
    the shared runs volume ``pvc`` at /runs; the scheduler asks for no GPU."""
    from dask_kubernetes.operator import make_cluster_spec

    spec = make_cluster_spec(name=name, image=image, n_workers=gpus, env={"DO_NOT_TRACK": "1"})
    pod = f"{-(-int(memory * 1.1) // GIB)}Gi"  # 10 % above Dask's limit: its nanny restarts the worker before the kernel kills the pod
    worker = spec["spec"]["worker"]["spec"]
    (container,) = worker["containers"]
    container["args"] += ["--nthreads", str(slots), "--resources", f"GPU={slots}", "--memory-limit", f"{-(-memory // GIB)}GiB"]
    container["resources"] = {"requests": {"nvidia.com/gpu": 1, "memory": pod}, "limits": {"nvidia.com/gpu": 1, "memory": pod}}
    container["volumeMounts"] = [{"name": "runs", "mountPath": RUNS_MOUNT}]
    worker["volumes"] = [{"name": "runs", "persistentVolumeClaim": {"claimName": pvc}}]
    (scheduler,) = spec["spec"]["scheduler"]["spec"]["containers"]
    scheduler["resources"] = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}
    return spec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="A Dask cluster of one-GPU workers for the search (SLURM or Kubernetes).")
    ap.add_argument("kind", choices=["slurm", "k8s"])
    ap.add_argument("--gpus", type=int, default=8, help="workers, one GPU each (default %(default)s)")
    ap.add_argument("--slots", type=int, default=4, help="evaluations per GPU: execution.slots_per_device (default %(default)s)")
    ap.add_argument("--features", help="the run's features.zarr: each worker's memory from its size")
    ap.add_argument("--memory-gb", type=float, default=64.0, help="each worker's memory without --features (default %(default)s)")
    ap.add_argument("--partition"), ap.add_argument("--account")
    ap.add_argument("--walltime", default="7-00:00:00")
    ap.add_argument("--prologue", action="append", default=[], help="a line run before each worker (e.g. activating the venv)")
    ap.add_argument("--print", action="store_true", help="SLURM: print one job's script and exit")
    ap.add_argument("--image", default="nasfcos:latest", help="Kubernetes: the image with nasfcos installed")
    ap.add_argument("--pvc", default="nasfcos-runs", help="Kubernetes: the claim of the shared runs volume")
    a = ap.parse_args(argv)
    memory = worker_memory(a.features, a.memory_gb)
    if a.kind == "k8s":
        import yaml

        spec = k8s_spec(gpus=a.gpus, slots=a.slots, memory=memory, image=a.image, pvc=a.pvc)
        print(f"# python deployments/cluster.py {' '.join(sys.argv[1:] if argv is None else argv)}")
        print("# A DaskCluster (dask-kubernetes operator) of one-GPU workers for the search; docs/operations.md, 'A cluster'.")
        print(yaml.safe_dump(spec, sort_keys=False), end="")
        return
    cluster = slurm_cluster(slots=a.slots, memory=memory, partition=a.partition, account=a.account, walltime=a.walltime, prologue=tuple(a.prologue))
    if a.print:
        print(cluster.job_script())
        cluster.close()
        return
    cluster.adapt(minimum_jobs=a.gpus, maximum_jobs=a.gpus)  # a job that ends (walltime, preemption) is submitted again
    print(f"execution.dask_address: {cluster.scheduler_address}   (devices: [cuda], slots_per_device: {a.slots}); Ctrl-C stops the cluster", flush=True)
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
