"""Device placement: slots per device, one resident feature copy per device and process,
Dask workers pinned to their own GPU. CPU only: ``cuda:N`` are names, never touched."""

import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest

from flows import placement
from flows.config import load_config
from nasfcos.errors import InfrastructureError


def _execution(**fields):
    return load_config("demo", {f"execution.{k}": v for k, v in fields.items()}).execution


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one time (an end at t closes before a start at t opens)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_slot_pool_spreads_over_devices_and_whole_device_tasks_get_one_each(monkeypatch):
    monkeypatch.setattr(placement, "_SLOTS", {})
    cfg = load_config("demo", {"execution.devices": ["cuda:0", "cuda:1"], "execution.slots_per_device": 2})
    assert placement.task_runner(cfg)._max_workers == 4  # a thread per slot
    ex = cfg.execution
    with placement.device_slot(ex, shared=True) as a, placement.device_slot(ex, shared=True) as b, placement.device_slot(ex, shared=True) as c:
        assert [a, b, c] == ["cuda:0", "cuda:1", "cuda:0"]  # round-robin: the first tasks spread out
    with placement.device_slot(ex) as a, placement.device_slot(ex) as b:
        assert {a, b} == {"cuda:0", "cuda:1"}  # full training etc.: one task per device


def test_an_evaluation_run_alone_waits_for_the_shared_slots_and_keeps_new_ones_out(monkeypatch):
    """Issue #26 fault 4: an arch that ran out of memory beside others runs again with its
    device to itself; on the thread runner the device's gate makes it so."""
    monkeypatch.setattr(placement, "_SLOTS", {})
    monkeypatch.setattr(placement, "_GATES", {})
    ex = _execution(devices=["cuda:0"], slots_per_device=3)
    spans, lock = {}, threading.Lock()

    def task(name, shared, hold):
        with placement.device_slot(ex, shared=shared):
            t0 = time.monotonic()
            time.sleep(hold)
            with lock:
                spans[name] = (t0, time.monotonic())

    first = threading.Thread(target=task, args=("shared-1", True, 0.4))
    first.start()
    time.sleep(0.1)
    alone = threading.Thread(target=task, args=("alone", False, 0.2))
    alone.start()
    time.sleep(0.1)
    later = threading.Thread(target=task, args=("shared-2", True, 0.1))  # arrives while the lone one waits
    later.start()
    for t in (first, alone, later):
        t.join(10)
    assert spans["shared-1"][1] <= spans["alone"][0] and spans["alone"][1] <= spans["shared-2"][0]


def test_a_drained_device_leaves_the_pool_until_the_search_ends(monkeypatch):
    monkeypatch.setattr(placement, "_SLOTS", {})
    monkeypatch.setattr(placement, "_DRAINED", set())
    ex = _execution(devices=["cuda:0", "cuda:1"], slots_per_device=1)
    placement.drain_device("cuda:0")
    for _ in range(2):
        with placement.device_slot(ex, shared=True) as device:
            assert device == "cuda:1"
    placement.drain_device("cuda:1")
    with pytest.raises(InfrastructureError, match=r"every device of this process is drained \(cuda:0, cuda:1\)"):
        with placement.device_slot(ex, shared=True):
            pass
    placement.undrain_devices()
    with placement.device_slot(ex, shared=True) as a, placement.device_slot(ex, shared=True) as b:
        assert {a, b} == {"cuda:0", "cuda:1"}


def test_cpu_slots_side_by_side_share_the_cores(monkeypatch):
    """Two cpu slots in one process: each task's torch ops get half the cores (torch's
    threads are per process; two tasks with all of them oversubscribe the CPU), unless
    OMP_NUM_THREADS says otherwise; one cpu slot keeps the process's own count, even after a
    share was set; a whole-device task gets the share of the shared slots beside it."""
    import torch

    monkeypatch.setattr(placement, "_SLOTS", {})
    monkeypatch.setattr(placement, "_PROCESS_THREADS", [])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with placement.device_slot(_execution(devices=["cpu"])):
            assert torch.get_num_threads() == 3
        with placement.device_slot(_execution(devices=["cpu", "cpu"])):
            assert torch.get_num_threads() == 4
        with placement.device_slot(_execution(devices=["cpu", "cpu"], slots_per_device=2), shared=True):
            assert torch.get_num_threads() == 2
        with placement.device_slot(_execution(devices=["cpu"])):
            assert torch.get_num_threads() == 3  # not the share an earlier task set
        with placement.device_slot(_execution(devices=["cpu"], slots_per_device=2)):
            assert torch.get_num_threads() == 4  # a whole-device task beside a shared slot
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        with placement.device_slot(_execution(devices=["cpu", "cpu"])):
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_device_groups_are_disjoint_and_one_task_holds_each(monkeypatch):
    monkeypatch.setattr(placement, "_SLOTS", {})
    ex = _execution(devices=[f"cuda:{i}" for i in range(4)])
    with placement.device_group(ex, 2) as a, placement.device_group(ex, 2) as b:
        assert sorted([a, b]) == [("cuda:0", "cuda:1"), ("cuda:2", "cuda:3")]
        third = ThreadPoolExecutor(1).submit(lambda: placement.device_group(ex, 2).__enter__())
        time.sleep(0.1)
        assert not third.done()  # both groups busy: a third training waits
    assert third.result(timeout=5) in (a, b)
    with placement.device_group(ex, 1) as one:  # one device per arch: the whole-device pool
        assert one in [("cuda:0",), ("cuda:1",), ("cuda:2",), ("cuda:3",)]


def test_dask_workers_own_one_device_and_gpu_tasks_ask_for_slots():
    import dask

    local = _execution(task_runner="dask", devices=["cuda:2", "cuda:3"], slots_per_device=2)
    assert placement.process_devices(local) == ("cuda:0",)  # pinned: GPU 2 is the worker's cuda:0
    assert placement.process_devices(_execution(task_runner="dask", devices=["cpu", "cpu"])) == ("cpu",)
    external = _execution(task_runner="dask", dask_address="tcp://10.0.0.1:8786", devices=["cuda"], slots_per_device=3)
    assert placement.process_devices(external) == ("cuda",)
    for ex, shared, want in [(local, True, {"GPU": 1}), (local, False, {"GPU": 2}), (external, False, {"GPU": 3})]:
        with placement.device_resources(ex, shared=shared):
            assert dask.get_annotations() == {"resources": want}
    for ex in (_execution(devices=["cuda:0"]), _execution(task_runner="dask", devices=["cpu"])):
        with placement.device_resources(ex, shared=True):
            assert dask.get_annotations() == {}  # thread runner, or CPU workers: nothing to ask for


def test_feature_cache_loads_once_per_device_and_never_waits_for_another_device(monkeypatch):
    from flows import feature_cache

    monkeypatch.setattr(feature_cache, "_CACHE", {})
    monkeypatch.setattr(feature_cache, "_LOADING", {})
    calls, loading, release = Counter(), threading.Event(), threading.Event()

    def load(key):
        device = key[1]
        calls[device] += 1
        if device == "cuda:0":  # a long load, e.g. features onto a GPU
            loading.set()
            assert release.wait(5)
        return ("splits", device)

    monkeypatch.setattr(feature_cache, "_load_splits", load)
    with ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(feature_cache.splits, ("store", "cuda:0", None, "auto", None)) for _ in range(2)]  # two slots of one device
        assert loading.wait(5)
        other = pool.submit(feature_cache.splits, ("store", "cuda:1", None, "auto", None))
        assert other.result(timeout=2) == ("splits", "cuda:1")  # not queued behind cuda:0's load
        release.set()
        assert [f.result(timeout=5) for f in slow] == [("splits", "cuda:0")] * 2
    assert calls == {"cuda:0": 1, "cuda:1": 1}


def test_search_on_four_fake_gpus_with_two_slots_each(prefect_server, tmp_path, monkeypatch):
    """16 evaluations on cuda:0..cuda:3 x 2 slots, thread runner: every device used, at
    most (and at some point exactly) 2 evaluations at once per device, one feature load
    per device in this process. The loader and the evaluator are fakes that record
    where and when they ran; the devices are only names."""
    import nasfcos.engine.proxy
    from flows import feature_cache
    from flows.search import search
    from nasfcos.arch import resolve

    devices = [f"cuda:{i}" for i in range(4)]
    loads, runs = [], []
    cond = threading.Condition()
    running = Counter()

    def load(key):
        device = key[1]
        with cond:
            loads.append((device, os.getpid()))
        time.sleep(0.2)  # the device's second slot starts meanwhile and must wait for this copy
        return ("meta_train", device), ("meta_val", device), 3

    def evaluate(arch, train, val, *, num_classes, cfg, device_shared=False, **_):
        device, started = train[1], datetime.now(timezone.utc)
        t0 = time.perf_counter()
        with cond:
            running[device] += 1
            cond.notify_all()
            cond.wait_for(lambda: running[device] >= 2, timeout=1.0)  # let a slot-mate overlap if the pool allows it
        time.sleep(0.1)
        with cond:
            running[device] -= 1
        runs.append((device, t0, time.perf_counter(), os.getpid()))
        a = resolve(arch)
        return {
            "arch_id": a.arch_id, "arch": str(a), "status": "ok", "reward": -1.0, "loss_cls": 0.5, "loss_reg": 0.3,
            "loss_ctr": 0.2, "params": 1, "macs": 1, "train_seconds": 0.1, "eval_seconds": 0.0, "peak_mem_mb": 0.0,
            "device": device, "seed": 0, "error": "", "started_at": started, "finished_at": datetime.now(timezone.utc),
        }  # fmt: skip

    monkeypatch.setattr(feature_cache, "_load_splits", load)
    monkeypatch.setattr(nasfcos.engine.proxy, "evaluate_arch", evaluate)
    cfg = load_config("demo", {
        "run_id": "slots", "runs_dir": str(tmp_path), "search.policy": "random", "search.total_archs": 16,
        "search.archs_per_step": 16, "execution.devices": devices, "execution.slots_per_device": 2,
    })  # fmt: skip
    out = search.with_options(task_runner=placement.task_runner(cfg))(cfg.model_dump(mode="json"))
    assert out["unique_archs"] == 16
    per_device = {d: [(s, e) for dev, s, e, _ in runs if dev == d] for d in devices}
    assert all(per_device.values()), {d: len(v) for d, v in per_device.items()}  # every device used
    assert {d: _most_at_once(v) for d, v in per_device.items()} == {d: 2 for d in devices}
    assert Counter(loads) == {(d, os.getpid()): 1 for d in devices}


def test_local_dask_cluster_pins_one_worker_per_gpu():
    """Two worker processes for [cuda:0, cuda:1], 2 slots each: each sees only its own GPU
    (CUDA_VISIBLE_DEVICES) and declares 2 GPU slots; an evaluation asks for one."""
    pytest.importorskip("distributed")
    from distributed import Client

    def seen(dask_worker):  # runs in each worker process
        w = dask_worker
        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), dict(w.state.total_resources), w.state.nthreads

    ex = _execution(task_runner="dask", devices=["cuda:0", "cuda:1"], slots_per_device=2)
    with placement.local_cluster(ex.devices, ex.slots_per_device, dashboard_address=":0") as cluster, Client(cluster) as client:
        workers = list(client.run(seen).values())
        with placement.device_resources(ex, shared=True):
            future = client.submit(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"), pure=False)
        ran_on = future.result(timeout=30)  # held, so the scheduler still knows the task
        asked = client.run_on_scheduler(lambda dask_scheduler, key=future.key: dask_scheduler.tasks[key].resource_restrictions)
        # as an external cluster: the search plans every worker's slots, not one device's
        external = {"task_runner": "dask", "dask_address": cluster.scheduler_address, "slots_per_device": 2}
        gpu_slots = placement.evaluation_slots(_execution(devices=["cuda"], **external))
        cpu_slots = placement.evaluation_slots(_execution(devices=["cpu"], **external))
    assert gpu_slots == 4 and cpu_slots == 4
    assert len({pid for pid, *_ in workers}) == 2 and os.getpid() not in {pid for pid, *_ in workers}
    assert sorted(cvd for _, cvd, _, _ in workers) == ["0", "1"]
    assert all(res == {"GPU": 2} and nthreads == 2 for _, _, res, nthreads in workers)
    assert asked == {"GPU": 1} and ran_on in ("0", "1")


def test_train_full_trains_one_arch_per_device_group_at_once(prefect_server, tmp_path, monkeypatch):
    """4 archs on cuda:0..cuda:3 with train_full.devices_per_arch 2: two trainings at once, each
    on its own disjoint pair. The trainer is a fake that records where and when it ran."""
    from pathlib import Path

    import pandas as pd

    import nasfcos.engine.distributed
    from flows.inputs import ensure_data
    from flows.train_full import train_full
    from nasfcos.arch import resolve
    from nasfcos.engine.train import TrainResult
    from storage.run_dir import RunDir

    runs, cond, running = [], threading.Condition(), [0]

    def fake_train(spec, dataset, cfg, out_dir, *, devices, **kwargs):
        t0 = time.perf_counter()
        with cond:
            running[0] += 1
            cond.notify_all()
            cond.wait_for(lambda: running[0] >= 2, timeout=1.0)  # let another group overlap if the pool allows it
        time.sleep(0.1)
        with cond:
            running[0] -= 1
        runs.append((tuple(devices), t0, time.perf_counter()))
        return TrainResult(checkpoint=Path(out_dir) / "checkpoint.pt", iteration=cfg.iterations, seconds=0.1)

    monkeypatch.setattr(nasfcos.engine.distributed, "train_on_devices", fake_train)
    monkeypatch.setattr(placement, "_SLOTS", {})
    cfg = load_config("demo", {
        "run_id": "groups", "runs_dir": str(tmp_path), "data.synthetic_num_train": 8, "data.synthetic_num_val": 4,
        "train_full.num_archs": 4, "train_full.devices_per_arch": 2, "execution.devices": [f"cuda:{i}" for i in range(4)],
        "train_full.jobs": None,  # tasks in the stage's process (jobs on a pool: tests/test_train_jobs.py)
    })  # fmt: skip
    run = RunDir.at(cfg.runs_dir, cfg.run_id)
    ensure_data(cfg, run)
    archs = [str(resolve(a)) for a in ("fpn-fcos", "nas-fcos-fpn", "nas-fcos")] + ["fpn=fcos;head=seq[1,1,1,1,1,1];share=0"]
    pd.DataFrame({"arch": archs, "arch_id": [resolve(a).arch_id for a in archs]}).to_parquet(run.top_k)
    out = train_full.with_options(task_runner=placement.task_runner(cfg))(cfg.model_dump(mode="json"))
    assert len(out["trained"]) == 4
    groups = {d for d, _, _ in runs}
    assert groups == {("cuda:0", "cuda:1"), ("cuda:2", "cuda:3")}
    assert _most_at_once([(s, e) for _, s, e in runs]) == 2
    assert all(_most_at_once([(s, e) for d, s, e in runs if d == g]) == 1 for g in groups)
