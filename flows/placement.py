"""Where tasks run: the task runner of a flow and this process's device slots."""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Iterator

from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import PipelineConfig


def task_runner(cfg: PipelineConfig):
    """Thread pool with one worker per device slot, or prefect-dask's DaskTaskRunner."""
    ex = cfg.execution
    if ex.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if ex.dask_address:
            return DaskTaskRunner(address=ex.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": ex.dask_workers, "threads_per_worker": 1, "processes": True})
    return ThreadPoolTaskRunner(max_workers=len(ex.devices))


_SLOTS: dict[tuple[str, ...], queue.Queue] = {}
_SLOTS_LOCK = threading.Lock()


@contextmanager
def device_slot(devices: tuple[str, ...]) -> Iterator[str]:
    """Borrow a free device from this process's pool of ``devices`` (one evaluation per slot).

    With the thread runner (as many workers as slots) a slot is always free when a
    task starts; Dask workers are separate processes, each with its own pool.
    """
    with _SLOTS_LOCK:
        if devices not in _SLOTS:
            q: queue.Queue = queue.Queue()
            for d in devices:
                q.put(d)
            _SLOTS[devices] = q
    q = _SLOTS[devices]
    device = q.get()
    try:
        yield device
    finally:
        q.put(device)
