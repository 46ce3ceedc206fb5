"""Where tasks run: the task runner of a flow, the Dask cluster it starts, and the
device slots of one process.

A *slot* is one place for one task on one device. A proxy evaluation (small @64
decoders rarely fill a GPU) takes one of ``execution.slots_per_device`` slots of a
device, so several evaluations share it; full training, evaluation and feature
materialisation take a whole device (full training: a disjoint group of
``train_full.devices_per_arch`` devices, :func:`device_group`). Tasks in one process that use the same device
share whatever that process keeps resident on it (``flows/search.py``'s features).

- ``task_runner: thread``: one process, ``len(devices) * slots_per_device`` threads,
  and a pool of device names per process that each task borrows from.
- ``task_runner: dask``, no address: one worker *process* per entry of ``devices``,
  pinned to its GPU with ``CUDA_VISIBLE_DEVICES`` (so it sees it as ``cuda:0``), with
  ``slots_per_device`` threads. Only a GPU listed twice gets two workers.
- ``task_runner: dask`` with ``dask_address``: workers started by hand, one per GPU
  (``CUDA_VISIBLE_DEVICES=i dask worker ADDR --nthreads S --resources GPU=S``);
  ``devices`` is the one name every worker uses for its own device.

On Dask, GPU tasks ask for the worker resource :data:`RESOURCE` (see
:func:`device_resources`), so the scheduler never puts more on a GPU than its slots.
"""

from __future__ import annotations

import os
import queue
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import ContextManager, Iterator, Sequence

from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import ExecutionSection, PipelineConfig
from nasfcos.errors import InfrastructureError

# A Dask worker resource counted in *slots* of one GPU: a worker declares
# GPU=slots_per_device, an evaluation asks for 1, a whole-device task for all of them.
# Whole units, not fractions: Dask's worker subtracts and re-adds each request, and
# 1/3 + 1/3 + 1/3 drifts past 1.0 in floating point, leaving a slot unusable.
RESOURCE = "GPU"

# A worker process's memory (every one keeps both proxy splits resident, flows/feature_cache.py):
FEATURE_COPIES = 2  # the store's read plus one staging copy (pinned host memory, or the transfer to the device)
BASE_BYTES = 4 * 2**30  # torch and the CUDA context, a decoder's training, the splits' assigned targets


def feature_bytes(store: str | Path) -> int | None:
    """Bytes of both proxy splits as the evaluations hold them; None before the store exists."""
    from nasfcos.engine.proxy import LEVELS
    from storage.features import FeatureStore

    if not Path(store).exists():
        return None
    fs = FeatureStore.open(store)
    return sum(fs.nbytes(split, LEVELS) for split in ("meta_train", "meta_val"))


def memory_needed(features: int | None) -> int | None:
    """What one worker process needs for ``features`` bytes of proxy features (None: unknown yet)."""
    return None if features is None else FEATURE_COPIES * features + BASE_BYTES


def memory_limit(workers: int, features: int | None, total: int | None = None) -> int | str:
    """A local cluster worker's memory limit: its share of this machine (Dask's own default),
    raised to what the features need. When the machine cannot hold every worker's copy, a
    warning says so and what to change (the limit is still raised: a worker killed at its
    limit is resubmitted and killed again, for ever)."""
    import psutil

    need = memory_needed(features)
    if need is None:
        return "auto"
    total = psutil.virtual_memory().total if total is None else total
    share = total // max(workers, 1)
    if need > share:
        run_logger().warning(
            "%d Dask workers x %.1f GB (%d x %.1f GB of proxy features + %.0f GB) exceed this machine's %.1f GB: "
            "use fewer devices (execution.devices) or a smaller meta split (proxy.meta_train)",
            workers, need / 1e9, FEATURE_COPIES, features / 1e9, BASE_BYTES / 1e9, total / 1e9,
        )  # fmt: skip
    return max(need, share)


def task_runner(cfg: PipelineConfig):
    """Thread pool with one worker per device slot, or prefect-dask's DaskTaskRunner."""
    ex = cfg.execution
    if ex.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if ex.dask_address:
            return DaskTaskRunner(address=ex.dask_address)
        features = feature_bytes(Path(cfg.runs_dir).resolve() / cfg.run_id / "features.zarr")
        limit = memory_limit(len(ex.devices), features)
        return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={"devices": list(ex.devices), "slots_per_device": ex.slots_per_device, "memory_limit": limit})
    return ThreadPoolTaskRunner(max_workers=evaluation_slots(ex))


def evaluation_slots(ex: ExecutionSection) -> int:
    """How many proxy evaluations run at once: ``slots_per_device`` on each device, or
    on an external Dask cluster what its workers declare (:func:`cluster_slots`)."""
    if ex.task_runner == "dask" and ex.dask_address:
        return cluster_slots(ex)
    return len(ex.devices) * ex.slots_per_device


def cluster_slots(ex: ExecutionSection, timeout: float = 60.0) -> int:
    """Evaluation slots of the workers connected to ``dask_address`` now: the sum of
    their ``GPU`` resources (GPU devices), else of their threads. Counted when the search
    starts: workers that join later take work, but the async search keeps only this
    many in flight until it is restarted. No worker within ``timeout``: one line, and
    ``slots_per_device``."""
    from distributed import Client

    with Client(ex.dask_address, timeout=timeout) as client:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            run_logger().warning("no Dask worker at %s after %.0f s: planning %d evaluation slots", ex.dask_address, timeout, ex.slots_per_device)
            return ex.slots_per_device
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        if ex.devices[0].startswith("cuda"):
            slots = sum(int(w.get("resources", {}).get(RESOURCE, 0)) for w in workers)
        else:
            slots = sum(int(w["nthreads"]) for w in workers)
    run_logger().info("Dask cluster %s: %d workers, %d evaluation slots", ex.dask_address, len(workers), slots)
    return max(slots, 1)


def local_cluster(devices: Sequence[str], slots_per_device: int = 1, dashboard_address: str = ":8787", memory_limit: int | str = "auto"):
    """A Dask cluster on this machine: one worker process per device, pinned to it.

    Plain ``CUDA_VISIBLE_DEVICES`` per worker rather than dask-cuda's
    ``LocalCUDACluster``, which pins dask through ``rapids-dask-dependency`` and pulls
    ``cuda-core`` for the same effect (DESIGN.md). The variable is set in the worker
    process before anything imports CUDA, so ``cuda:N`` is that worker's ``cuda:0``.
    ``cpu`` workers get no GPU resource and no ``CUDA_VISIBLE_DEVICES``. Everything
    listens on 127.0.0.1; the scheduler's dashboard on ``dashboard_address`` (``:0``: any
    free port). ``memory_limit``: each worker's (:func:`memory_limit`: sized for
    the proxy features it keeps resident).
    """
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {}
    for i, device in enumerate(devices):
        options: dict = {"nthreads": slots_per_device, "host": "127.0.0.1", "memory_limit": memory_limit}
        if device.startswith("cuda"):
            options["env"] = {"CUDA_VISIBLE_DEVICES": device.split(":")[1]}
            options["resources"] = {RESOURCE: slots_per_device}
        workers[f"{i}-{device}"] = {"cls": Nanny, "options": options}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": dashboard_address}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="nasfcos")


def run_logger():
    """The flow run's logger (shown in the UI), or this module's outside a run."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger(__name__)


def process_devices(ex: ExecutionSection) -> tuple[str, ...]:
    """The devices tasks in this process use, as this process names them.

    The thread runner's process uses all of ``devices``. A Dask worker owns one device:
    a local cluster's worker sees its pinned GPU as ``cuda:0``; a hand-started worker
    uses ``devices``' one name (checked in the config).
    """
    if ex.task_runner == "thread" or ex.dask_address:
        return ex.devices
    return ("cuda:0",) if ex.devices[0].startswith("cuda") else ("cpu",)


def device_resources(ex: ExecutionSection, *, shared: bool = False) -> ContextManager:
    """Around a ``.map``/``.submit``: on Dask with GPUs, the tasks submitted inside ask
    for one slot of a GPU (``shared``) or all of its slots; elsewhere nothing.

    An annotation because prefect-dask's runner takes no per-task resources; Dask's
    ``Client.submit`` reads ``dask.annotate`` in the submitting thread.
    """
    request = resource_request(ex, shared=shared)
    if request is None:
        return nullcontext()
    import dask

    return dask.annotate(resources=request)


def resource_request(ex: ExecutionSection, *, shared: bool) -> dict[str, int] | None:
    """The Dask resources a task asks for: one slot of a GPU (``shared``) or all its slots;
    None off Dask or without GPUs."""
    if ex.task_runner != "dask" or not process_devices(ex)[0].startswith("cuda"):
        return None
    return {RESOURCE: 1 if shared else ex.slots_per_device}


_SLOTS: dict[tuple, queue.Queue] = {}  # a pool of devices or of device groups -> its free ones
_SLOTS_LOCK = threading.Lock()


@contextmanager
def device_slot(ex: ExecutionSection, *, shared: bool = False) -> Iterator[str]:
    """Borrow a free slot of one of this process's devices; yields the device name.

    ``shared``: one of ``slots_per_device`` slots (proxy evaluations); otherwise the
    whole device. The pool is filled round-robin (every device once, then again), so
    the first tasks spread over all devices. The thread runner has a thread per shared
    slot, so whole-device tasks may wait here for a device; Dask workers are separate
    processes, each with its own pool.
    """
    if ex.task_runner == "thread":  # whole-device tasks too: they may run beside shared ones
        share_cpu_threads(process_devices(ex) * ex.slots_per_device)
    pool = process_devices(ex) * (ex.slots_per_device if shared else 1)
    with _borrow(pool) as device, _gate(device).hold(alone=not shared):
        _THREAD.device = device
        yield device


_THREAD = threading.local()


def last_device() -> str:
    """The device this thread last borrowed since :func:`forget_device` ('' when none): where
    a failed task ran."""
    return getattr(_THREAD, "device", "")


def forget_device() -> None:
    """Start of a task: a failure before it borrows a device is not charged to the last one."""
    _THREAD.device = ""


class _Gate:
    """One device's shared slots against a task that needs it alone (whole-device tasks; an
    evaluation run again after running out of memory beside others): the lone task waits
    for the shared ones to finish and new shared ones wait for it, so it really is alone."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.shared, self.alone, self.waiting = 0, False, 0

    @contextmanager
    def hold(self, *, alone: bool) -> Iterator[None]:
        with self.cond:
            if alone:
                self.waiting += 1
                self.cond.wait_for(lambda: not self.alone and self.shared == 0)
                self.waiting -= 1
                self.alone = True
            else:
                self.cond.wait_for(lambda: not self.alone and self.waiting == 0)
                self.shared += 1
        try:
            yield
        finally:
            with self.cond:
                if alone:
                    self.alone = False
                else:
                    self.shared -= 1
                self.cond.notify_all()


_GATES: dict[str, _Gate] = {}
_DRAINED: set[str] = set()  # this process's devices taken out of service (the search's failure budget)


def _gate(device: str) -> _Gate:
    with _SLOTS_LOCK:
        return _GATES.setdefault(device, _Gate())


def drain_device(device: str) -> None:
    """Take one of this process's devices out of service: tasks borrow the others from now
    on (the search's per-worker failure budget, ``nasfcos.search.failures.Failures``), until
    :func:`undrain_devices`."""
    with _SLOTS_LOCK:
        _DRAINED.add(device)


def undrain_devices() -> None:
    """Every device back in service: the search that drained some has ended (the stages
    after it, or the next search of this process, start from whole pools again)."""
    with _SLOTS_LOCK:
        if _DRAINED:
            _DRAINED.clear()
            _SLOTS.clear()  # the pools lost their drained entries: made afresh on next use


_PROCESS_THREADS: list[int] = []  # torch's thread count in this process before share_cpu_threads


def share_cpu_threads(pool: Sequence[str]) -> None:
    """Several ``cpu`` slots in this process (``pool``: every evaluation slot of its
    devices): give each task's torch ops an equal share of the cores, so tasks side by side
    do not each use all of them; on 2 cores two 1-thread trainings ran 1.9x the iterations
    of one 2-thread training (docs/fidelity.md, "The demo's sizes, and why"). torch keeps a
    count per thread, which a thread takes from the last ``set_num_threads`` of any thread
    at its first parallel op: so every task that borrows a slot sets its own, whole-device
    ones included. They used to keep whatever the search's tasks had set, and a resumed
    run, whose process had skipped the search, trained with another count and other
    numbers. One ``cpu`` slot gets the process's own count back. ``OMP_NUM_THREADS``, when set, rules."""
    cpus = sum(d == "cpu" for d in pool)
    if not cpus or os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    if not _PROCESS_THREADS:
        _PROCESS_THREADS.append(torch.get_num_threads())  # before this function first changed it
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // cpus) if cpus > 1 else _PROCESS_THREADS[0])


@contextmanager
def device_group(ex: ExecutionSection, size: int) -> Iterator[tuple[str, ...]]:
    """Borrow ``size`` devices for one data-parallel training (``train_full.devices_per_arch``).

    This process's devices split into disjoint consecutive groups (the config checks that
    ``size`` divides them and that the runner is the thread one), one task per group at a
    time, so as many archs train at once as there are groups. ``size`` 1 borrows a whole
    device from :func:`device_slot`'s pool.
    """
    if size == 1:
        with device_slot(ex) as device:
            yield (device,)
        return
    devices = process_devices(ex)
    with _borrow(tuple(devices[i : i + size] for i in range(0, len(devices), size))) as group:
        yield group


@contextmanager
def _borrow(pool: tuple) -> Iterator:
    """Take one entry of this process's queue for ``pool`` (made on first use), give it back after."""
    with _SLOTS_LOCK:
        if pool not in _SLOTS:
            q: queue.Queue = queue.Queue()
            for entry in pool:
                q.put(entry)
            _SLOTS[pool] = q
    q = _SLOTS[pool]
    while True:
        entry = q.get()
        drained = {entry} & _DRAINED if isinstance(entry, str) else set(entry) & _DRAINED
        if not drained:
            break
        if all((e in _DRAINED) if isinstance(e, str) else (set(e) & _DRAINED) for e in pool):
            q.put(entry)
            raise InfrastructureError(f"every device of this process is drained ({', '.join(sorted(_DRAINED))})")
        # a drained entry leaves the pool: not put back
    try:
        yield entry
    finally:
        q.put(entry)
