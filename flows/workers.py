"""The Dask workers a run's evaluations go to, fit for a cluster (issue #27).

- **Memory**: every worker process keeps both proxy splits resident (``flows/feature_cache.py``),
  ~50 GB at the paper's size. Below that, Dask's nanny kills the worker, its evaluation is
  resubmitted elsewhere and killed again, in a loop. A local cluster's workers get a limit
  sized from the feature store (``flows.placement.memory_limit``); a worker of an external cluster with
  less is named before the search starts.
- **Checks** (:func:`problems`): each worker's package versions and code (the same
  fingerprint as the flow's), its device (CUDA present; on an external cluster not the same
  GPU as another worker of its host: one ``--nworkers 8`` job without
  ``CUDA_VISIBLE_DEVICES`` puts all eight on GPU 0), its paths (the run directory writable,
  the feature store there), its memory limit; and that some worker declares the ``GPU``
  slots a whole-device task asks for (Dask would leave it waiting for ever). Preflight runs them on the workers connected when the run
  starts; the search stage again on those it dispatches to. Workers that join later are
  not checked (they run the same image in every recipe of ``deployments/``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from pathlib import Path

from flows.placement import RESOURCE, feature_bytes, memory_needed
from nasfcos.errors import InfrastructureError

PACKAGES = ("nasfcos", "flows", "storage", "atomicio")  # the code a worker runs: fingerprinted


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 (16 hex) of the Python sources a worker runs: equal on the flow and every worker,
    or a worker evaluates archs with other code than the run was started with."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def facts(paths: dict[str, str], device: str) -> dict:
    """What :func:`problems` compares, as one process sees it (run on every worker; also
    in the flow, for the reference). ``device``: the name the evaluations use (``cuda``,
    ``cuda:1`` or ``cpu``)."""
    import torch

    from storage.run_dir import versions

    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.partition(":")[2] or 0)
        if index < torch.cuda.device_count():
            gpu = str(torch.cuda.get_device_properties(index).uuid)
    return {
        "host": socket.gethostname(),
        "versions": versions(),
        "code": code_fingerprint(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu": gpu,
        "paths": {name: _access(Path(p), writable=name == "run") for name, p in paths.items()},
    }


def _access(path: Path, *, writable: bool) -> str:
    if not path.exists():
        return "missing"
    if writable and not os.access(path, os.W_OK):
        return "not writable"
    return "ok"


def problems(seen: dict[str, dict], info: dict[str, dict], mine: dict, *, device: str, slots_per_device: int, need: int | None, own_gpus: bool = True) -> list[str]:
    """One line per problem of the workers. ``seen``: worker name -> :func:`facts` there;
    ``info``: worker name -> the scheduler's record of it (``resources``, ``memory_limit``);
    ``mine``: the flow's :func:`facts`; ``need``: bytes a worker needs (None: not known yet);
    ``own_gpus``: each worker should have a GPU of its own (started by hand or by a batch
    system; a local cluster pins its workers itself, and a GPU listed twice there is meant)."""
    out: list[str] = []
    gpu = device.startswith("cuda")
    by_gpu: dict[tuple[str, str], list[str]] = {}
    for name, f in sorted(seen.items()):
        if isinstance(f, BaseException):
            out.append(f"Dask worker {name}: its checks failed ({type(f).__name__}: {f})")
            continue
        differ = [f"{k} {v} (flow: {mine['versions'].get(k)})" for k, v in sorted(f["versions"].items()) if v != mine["versions"].get(k)]
        if differ:
            out.append(f"Dask worker {name}: other package versions than the flow's: {', '.join(differ)}")
        if f["code"] != mine["code"]:
            out.append(f"Dask worker {name}: other nasfcos code than the flow's (fingerprint {f['code']}, flow {mine['code']}): install the same commit on every machine")
        bad = [f"{k} {v}" for k, v in sorted(f["paths"].items()) if v != "ok" and mine["paths"].get(k) == "ok"]
        if bad:
            out.append(f"Dask worker {name} on {f['host']}: {', '.join(bad)} there (the run directory must be on storage every worker shares)")
        if gpu and f["gpu"] is None:
            out.append(f"Dask worker {name} on {f['host']}: no CUDA device {device} (it sees {f['cuda_devices']})")
        elif gpu:
            by_gpu.setdefault((f["host"], f["gpu"]), []).append(name)
        limit = info.get(name, {}).get("memory_limit") or 0
        if need is not None and 0 < limit < need:
            out.append(
                f"Dask worker {name}: memory limit {limit / 1e9:.1f} GB, the proxy features need {need / 1e9:.1f} GB per worker "
                f"(start it with --memory-limit {_gb(need)} or 0; below that Dask kills it on loading them, again and again)"
            )
    have = {name: w.get("resources", {}).get(RESOURCE, 0) for name, w in sorted(info.items())}
    if gpu and have and max(have.values()) < slots_per_device:  # Dask would leave whole-device tasks waiting for ever
        shown = ", ".join(f"{n}: {RESOURCE}={v:g}" for n, v in list(have.items())[:8])
        out.append(
            f"no Dask worker can run a whole-device task: it asks {RESOURCE}={slots_per_device} (execution.slots_per_device) of one worker, "
            f"the workers declare {shown}; start each worker with --resources {RESOURCE}={slots_per_device} or set execution.slots_per_device to what they declare"
        )
    for (host, uuid), names in sorted(by_gpu.items()) if own_gpus else ():
        if len(names) > 1:
            out.append(f"Dask workers {', '.join(names)} on {host} all use GPU {uuid}: one worker per GPU (CUDA_VISIBLE_DEVICES per worker; see docs/operations.md, 'A cluster')")
    return out


def _gb(n: int) -> str:
    return f"{-(-n // 10**9)}GB"


def check(client, cfg, run_root: Path) -> list[str]:
    """:func:`problems` of the workers connected to ``client`` now (none: nothing to check)."""
    from flows.placement import process_devices

    ex = cfg.execution
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not workers:
        return []
    features = run_root / "features.zarr"
    # a fresh run's directory is made by its first stage: its parent then
    paths = {"run": str(run_root if run_root.exists() else run_root.parent), "features": str(features)}
    info = {w.get("name", a): w for a, w in workers.items()}
    names = {a: w.get("name", a) for a, w in workers.items()}
    device = process_devices(ex)[0]  # as a worker names its own device (a local cluster's: cuda:0)
    try:
        seen = client.run(facts, paths, device, on_error="return", wait=True)
    except (OSError, TimeoutError) as e:
        raise InfrastructureError(f"Dask cluster: the workers' checks did not come back ({e})") from e
    mine = facts(paths, "cpu")
    return problems(
        {names.get(a, a): f for a, f in seen.items()}, info, mine,
        device=device, slots_per_device=ex.slots_per_device, need=memory_needed(feature_bytes(features)), own_gpus=bool(ex.dask_address),
    )  # fmt: skip
