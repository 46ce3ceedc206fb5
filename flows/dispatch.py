"""How the search's evaluations run: plain futures submitted from the search stage, not a
Prefect task per arch (issue #27).

A Prefect task per arch cost the flow process 20-550 ms of CPU each (task-run creation and
state reports; on Dask, prefect-dask serialising the whole settings context per task), so a
2-core flow process dispatched ~9 archs/s at most on threads and ~3 on Dask, where 256 GPU
slots of 15 s need 17/s; with plain futures the same 2 cores ran 256 slots of 15 s at 0.845
utilisation, 14.7 archs/s (benchmarks/search_scaling.py, RESULTS.md "Search dispatch"). Prefect keeps the stages, the
run and the UI: the search's log has a line per evaluation (the loop's), its progress
artifact moves, and on Dask each evaluation is a task ``evaluate-<arch id>-…`` in the
dashboard. Each evaluation still writes its own row before its future resolves
(``flows.search.evaluate_decoder``).

- :class:`ThreadDispatch` (``execution.task_runner: thread``): a pool of one thread per
  device slot in the flow process; each evaluation runs in a copy of the flow's context, so
  its own log lines reach the flow run too.
- :class:`DaskDispatch` (``task_runner: dask``): ``distributed`` futures on the flow's
  cluster (a local one, or the workers at ``execution.dask_address``); the features stay
  resident in each worker process (``flows/feature_cache.py``); on GPUs an evaluation asks
  for one slot of its worker's ``GPU`` resource, one run alone for all of them, and a
  request no worker can ever meet is an error at once, not a silent wait.

Either stops its evaluations when the search stops (:meth:`Dispatch.close` with
``cancel=True``: a Cancel in the UI, a SIGTERM, an error): each sees it at its next
training batch (``nasfcos.cancel``) and frees its slot. A flow process killed outright
drops its Dask client, and the scheduler releasing its tasks cancels them the same way.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flows import feature_cache
from flows.placement import drain_device, evaluation_slots, resource_request, run_logger, undrain_devices
from nasfcos import cancel
from nasfcos.errors import InfrastructureError

Evaluate = Callable[..., dict]  # flows.search.evaluate_decoder
CLOSE_WAIT_S = 30.0  # how long a closing thread dispatch waits for its evaluations to stop


class Dispatch:
    """What the search loop is given: ``submit`` (async), ``evaluate`` (sync), ``drain``,
    and ``close`` when the search ends; ``slots``: evaluations it runs at once.
    ``payload``: the keyword arguments every evaluation gets besides its job's."""

    slots: int

    def __init__(self, evaluate: Evaluate, payload: dict, *, lost_after_s: float | None) -> None:
        self.fn, self.payload, self.lost_after_s = evaluate, payload, lost_after_s
        self.outstanding: set = set()  # futures not yet done: cancelled when the search stops
        self._lock = threading.Lock()

    def arguments(self, job) -> dict:
        rung = {"rung": job.rung, "history": [float(v) for v in job.history]} if job.epochs is not None else {}
        return {**self.payload, "arch": str(job.arch), "arch_id": job.arch.arch_id, "step": job.step, "sample": job.sample, "alone": job.alone, **rung}

    def submit(self, job):
        future = self._submit(job)
        with self._lock:
            self.outstanding.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future) -> None:
        with self._lock:
            self.outstanding.discard(future)

    def _submit(self, job):
        raise NotImplementedError

    def evaluate(self, jobs) -> Iterator[dict]:
        """A sync step's records as they finish. When no evaluation finishes for
        ``lost_after_s`` seconds, the unfinished ones are lost (a call hung in the device
        must not stall the search for ever)."""
        from nasfcos.errors import EvaluationLost
        from nasfcos.search.rows import lost_record

        futures = {j.arch.arch_id: self.submit(j) for j in jobs}
        done: queue.SimpleQueue[str] = queue.SimpleQueue()
        for aid, future in futures.items():
            future.add_done_callback(lambda _, aid=aid: done.put(aid))
        pending = set(futures)
        while pending:
            try:
                aid = done.get(timeout=self.lost_after_s)
            except queue.Empty:
                for aid in sorted(pending):
                    yield lost_record(aid, EvaluationLost(f"no result after {self.lost_after_s:g} s (execution.timeouts.search)"))
                return
            pending.discard(aid)
            try:
                yield futures[aid].result()
            except Exception as e:  # noqa: BLE001 - lost, evaluated again by the loop
                yield lost_record(aid, e)

    def drain(self, worker: str) -> None:
        raise NotImplementedError

    def close(self, *, cancel: bool) -> None:
        """The search is over (``cancel``: stopped): evaluations still running are stopped,
        the cached features freed wherever evaluations ran, drained devices back in service."""
        raise NotImplementedError


class ThreadDispatch(Dispatch):
    """Evaluations on threads of the flow process, one per device slot."""

    def __init__(self, evaluate: Evaluate, payload: dict, *, slots: int, lost_after_s: float | None) -> None:
        super().__init__(evaluate, payload, lost_after_s=lost_after_s)
        self.slots = slots
        self.pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="evaluate")
        self.stopped = threading.Event()

    def _submit(self, job):
        return self.pool.submit(contextvars.copy_context().run, self._run, self.arguments(job))

    def _run(self, kwargs: dict) -> dict:
        with cancel.watch(self.stopped.is_set):
            return self.fn(**kwargs)

    def drain(self, worker: str) -> None:
        if worker:
            drain_device(worker)  # its slots' threads borrow the other devices from now on

    def close(self, *, cancel: bool) -> None:
        """Evaluations still running are stopped at their next batch (at a normal end only
        lost ones run: their archs were settled without them); one that never reaches a
        batch (hung in the device) is named and left behind, never waited for."""
        from concurrent.futures import wait

        self.stopped.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            running = list(self.outstanding)
        _, stuck = wait(running, timeout=CLOSE_WAIT_S)
        if stuck:
            run_logger().warning("%d evaluation(s) did not stop within %.0f s (hung in the device?); left running until this process ends", len(stuck), CLOSE_WAIT_S)
        feature_cache.free()
        undrain_devices()


def _on_worker(fn: Evaluate, kwargs: dict) -> dict:
    """An evaluation in a Dask worker thread, stopped at its next batch once the scheduler
    releases its task (the search cancelled it, or its client, the flow, is gone)."""
    from distributed import get_worker
    from distributed.worker import thread_state

    tasks, key = get_worker().state.tasks, thread_state.key

    def released() -> bool:
        ts = tasks.get(key)
        return ts is None or ts.state in ("cancelled", "released", "forgotten")

    with cancel.watch(released):
        return fn(**kwargs)


class DaskDispatch(Dispatch):
    """Evaluations as ``distributed`` futures on the flow's Dask cluster."""

    def __init__(self, evaluate: Evaluate, payload: dict, *, client, cfg, lost_after_s: float | None) -> None:
        from flows import workers

        super().__init__(evaluate, payload, lost_after_s=lost_after_s)
        self.client, self.ex = client, cfg.execution
        self.slots = evaluation_slots(self.ex)
        found = workers.check(client, cfg, Path(cfg.runs_dir).resolve() / cfg.run_id)
        if found:
            raise InfrastructureError(f"{len(found)} problem{'s' * (len(found) > 1)} with the Dask workers: " + "; ".join(found))

    def _submit(self, job):
        resources = resource_request(self.ex, shared=not job.alone)
        key = f"evaluate-{job.arch.arch_id}-{uuid.uuid4().hex[:8]}"
        return self.client.submit(_on_worker, self.fn, self.arguments(job), key=key, resources=resources, pure=False)

    def drain(self, worker: str) -> None:
        """Retire a failing worker (its archs go to the others; never the last one: the
        search stops instead)."""
        if "://" not in worker:
            return
        if len(self.client.scheduler_info(n_workers=-1)["workers"]) <= 1:
            run_logger().error("%s is the cluster's last worker: not retired", worker)
            return
        threading.Thread(target=self.client.retire_workers, kwargs={"workers": [worker], "close_workers": True}, daemon=True).start()

    def close(self, *, cancel: bool) -> None:
        with self._lock:  # at a normal end only lost evaluations run: their archs were settled without them
            running = list(self.outstanding)
        if running:
            self.client.cancel(running, force=True)  # each worker sees its task released at its next batch
        try:
            self.client.run(feature_cache.free)  # every worker: full training needs the memory next
        except Exception as e:  # noqa: BLE001 - a worker that left takes its cache with it
            run_logger().warning("freeing the workers' cached features: %s", e)


def make_dispatch(cfg, evaluate: Evaluate, payload: dict) -> Dispatch:
    """The dispatch of ``execution.task_runner``; on Dask, on the flow's own cluster."""
    ex, lost_after_s = cfg.execution, cfg.execution.timeouts.search
    if ex.task_runner == "dask":
        from prefect.context import FlowRunContext

        return DaskDispatch(evaluate, payload, client=FlowRunContext.get().task_runner.client, cfg=cfg, lost_after_s=lost_after_s)
    return ThreadDispatch(evaluate, payload, slots=evaluation_slots(ex), lost_after_s=lost_after_s)
