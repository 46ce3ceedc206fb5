"""Stage 3, ``search`` (paper §3.3): the controller samples decoders, each is scored on the
proxy task by a parallel Prefect task (one per device slot), PPO updates the controller.

The loop itself is ``nasfcos.search.run_search`` (``search.mode: sync``: a step's
archs mapped onto tasks) or ``run_search_async`` (``async``: one task submitted per
freed device slot); this flow only turns its evaluations into tasks and reports
progress. Every record lands in
``results.parquet`` as it finishes; the controller checkpoint makes the stage
resumable after a crash without evaluating any arch twice.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone

from prefect import get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from flows.placement import device_resources, device_slot, evaluation_slots, run_logger
from flows.stages import artifact_key, open_stage, portable, stage_flow, task_options
from nasfcos.faults import fault_point

STAGE = "search"
_Key = tuple[str, str, float | None, str, str | None]  # (feature store, device, size_range_scale, residency, staging dir)
_CACHE: dict[_Key, tuple] = {}
_LOADING: dict[_Key, threading.Lock] = {}  # one lock per key: a load never waits for another device's
_CACHE_LOCK = threading.Lock()


def _load_splits(key: _Key) -> tuple:
    """(meta_train, meta_val, num_classes): both proxy splits read from the store (or this
    machine's staged copy of it) onto ``device``, or into host memory to be streamed.
    A damaged staged copy is dropped and the shared store read instead (which repairs
    nothing if it is sound, and names its own damage if not)."""
    import shutil

    from storage.features import DamagedShard
    from storage.staging import stage_store

    features, device, size_range_scale, residency, stage_dir = key
    if not stage_dir:
        return _read_splits(features, device, size_range_scale, residency)
    local = stage_store(features, stage_dir)
    try:
        return _read_splits(str(local), device, size_range_scale, residency)
    except DamagedShard as e:
        run_logger().warning("staged copy %s is damaged (%s); removed, reading %s", local, e, features)
        shutil.rmtree(local, ignore_errors=True)
        return _read_splits(features, device, size_range_scale, residency)


def _read_splits(path: str, device: str, size_range_scale: float | None, residency: str) -> tuple:
    import torch

    from nasfcos.proxy import LEVELS, prepare_split, stream_features
    from storage.features import FeatureStore

    store = FeatureStore.open(path)
    k = int(store.attrs["num_classes"])
    splits = ("meta_train", "meta_val")
    stream = stream_features(sum(store.nbytes(s, LEVELS) for s in splits), device, residency)
    out = []
    for split in splits:
        d = store.read_split(split, levels=list(LEVELS))
        feats = {lv: torch.from_numpy(d["features"][lv]) for lv in LEVELS}
        out.append(prepare_split(feats, d["boxes"], d["labels"], num_classes=k, device=device, size_range_scale=size_range_scale, stream=stream))
    return (*out, k)


def _splits(key: _Key) -> tuple:
    """Both proxy splits for one device, loaded once per process and device: the
    slots of one device share this copy, and a slot that starts while another is
    loading it waits for that load instead of loading a second copy."""
    with _CACHE_LOCK:
        lock = _LOADING.setdefault(key, threading.Lock())
    with lock:
        if key not in _CACHE:
            _CACHE[key] = _load_splits(key)
        return _CACHE[key]


def _free_cache() -> None:
    import torch

    with _CACHE_LOCK:
        _CACHE.clear()
        _LOADING.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@task(task_run_name="evaluate {arch_id}")
def evaluate_decoder(config: dict, arch: str, arch_id: str, step: int, sample: int) -> dict:
    """Train one decoder on the cached features, append its row to results.parquet, return it.

    The task appends the row itself so that a finished evaluation is durable the
    moment it ends, whatever happens to the flow process afterwards; a retry finds
    that row and returns it instead of training the arch again.
    """
    from prefect.runtime import task_run

    from nasfcos.proxy import ProxyConfig, evaluate_arch
    from nasfcos.search import make_row
    from storage.results import ResultsTable

    cfg, run, _, _ = open_stage(config, STAGE)
    table = ResultsTable(run.root)
    if task_run.run_count > 1 and (row := table.get(arch_id)) is not None:
        return row  # the earlier attempt finished its row, then failed
    p, ex = cfg.proxy, cfg.execution
    pc = ProxyConfig(width=p.width, lr=p.lr, batch_size=p.batch_size, epochs=p.epochs, ema_decay=p.ema_decay, eval_batch_size=p.batch_size, seed=p.seed)
    with device_slot(ex, shared=True) as device:
        train, val, k = _splits((str(run.features), device, p.size_range_scale, ex.feature_residency, ex.stage_features))
        record = evaluate_arch(arch, train, val, num_classes=k, cfg=pc, device_shared=ex.slots_per_device > 1)
    row = make_row(record, step=step, sample=sample, penalty=cfg.search.failure_penalty)
    table.write_part([row])  # lock-free: only the flow compacts
    with open(run.root / "evaluations.log", "a") as f:  # audit trail: one line per finished evaluation
        f.write(f"{datetime.now(timezone.utc).isoformat()} {arch_id} {record['status']} {record['device']} pid={os.getpid()}\n")
    fault_point("search:row")
    get_run_logger().info("%s: %s reward %.4f (%.1f s)", arch_id, record["status"], record["reward"], record["train_seconds"])
    return row


@stage_flow(STAGE)
def search(config: dict | str = "demo") -> dict:
    """Sample, evaluate in parallel, update; until search.total_archs unique archs are scored."""
    from nasfcos.controller import ControllerConfig, build_policy
    from nasfcos.search import SearchConfig, lost_record, run_search, run_search_async
    from storage.results import ResultsTable

    cfg, run, h, done = open_stage(config, STAGE)
    if done:
        return run.manifest(STAGE)["outputs"]
    config = portable(cfg)
    s = cfg.search
    results = ResultsTable(run.root)
    controller = ControllerConfig(lr=s.controller_lr, ppo_epochs=s.ppo_epochs, update=s.controller_update)
    policy = build_policy(s.policy, seed=s.seed, config=controller, head=s.head)
    progress = create_progress_artifact(
        progress=100.0 * min(len(results), s.total_archs) / s.total_archs,
        key=artifact_key(cfg, "search-progress"),
        description=f"archs evaluated out of {s.total_archs}",
    )

    timeout = cfg.execution.timeouts.search
    task = evaluate_decoder.with_options(**task_options(cfg, STAGE, device_shared=cfg.execution.slots_per_device > 1))

    def evaluate(jobs):
        with device_resources(cfg.execution, shared=True):  # on Dask: one slot of a GPU each
            futures = task.map(
                config=unmapped(config),
                arch=[str(j.arch) for j in jobs],
                arch_id=[j.arch.arch_id for j in jobs],
                step=[j.step for j in jobs],
                sample=[j.sample for j in jobs],
            )
        ids = {id(f): j.arch.arch_id for f, j in zip(futures, jobs)}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as e:  # noqa: BLE001 - after its retries: lost, evaluated again
                yield lost_record(ids[id(future)], e)

    def submit(job):
        with device_resources(cfg.execution, shared=True):
            return task.submit(config=config, arch=str(job.arch), arch_id=job.arch.arch_id, step=job.step, sample=job.sample)

    def on_step(info: dict) -> None:
        update_progress_artifact(progress, 100.0 * min(info["unique_archs"], s.total_archs) / s.total_archs)

    loop = dict(
        policy=policy, results=results, state_path=run.controller, on_step=on_step,
        cfg=SearchConfig(
            total_archs=s.total_archs, archs_per_step=s.archs_per_step, failure_penalty=s.failure_penalty,
            max_consecutive_failures=s.max_consecutive_failures, lost_after_s=None if timeout is None else timeout + 120,
        ),
    )  # fmt: skip
    try:
        if s.mode == "async":
            # evaluate_decoder writes its row before it returns
            summary = run_search_async(submit=submit, slots=evaluation_slots(cfg.execution), evaluator_writes_rows=True, **loop)
        else:
            summary = run_search(evaluate=evaluate, **loop)
    finally:  # the cached features must not hold device memory during full training
        _free_cache()
    df = results.read()
    create_markdown_artifact(
        key=artifact_key(cfg, "search"),
        markdown=f"# {STAGE}\n\n{summary.unique_archs} unique archs ({int((df.status == 'failed').sum())} failed) in "
        f"{summary.steps} controller steps ({s.policy}, {s.mode}); best reward {summary.best_reward:.4f}:\n\n`{summary.best_arch}`\n\n"
        f"Results: `{run.root / 'results.parquet'}`",
        description="search summary",
    )
    out = {"results": str(run.root / "results.parquet"), "unique_archs": summary.unique_archs, "best_reward": summary.best_reward, "best_arch": summary.best_arch}
    run.finish(STAGE, h, out)
    return out
