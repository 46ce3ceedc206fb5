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


def proxy_record(cfg, run, arch: str, *, epochs: int | None = None, resume: dict | None = None, keep_state=None) -> dict:
    """``arch`` trained and scored on the proxy task (``nasfcos.proxy.evaluate_arch``) on
    a device slot, with this process's cached features: the search's evaluations and the
    baselines' proxy rewards (train-full) are computed alike. ``epochs`` (default
    ``proxy.epochs``), ``resume``, ``keep_state``: a rung of successive halving."""
    from nasfcos.proxy import ProxyConfig, evaluate_arch

    p, ex = cfg.proxy, cfg.execution
    epochs = p.epochs if epochs is None else epochs
    pc = ProxyConfig(width=p.width, lr=p.lr, batch_size=p.batch_size, epochs=epochs, ema_decay=p.ema_decay, eval_batch_size=p.batch_size, seed=p.seed)
    with device_slot(ex, shared=True) as device:
        train, val, k = _splits((str(run.features), device, p.size_range_scale, ex.feature_residency, ex.stage_features))
        return evaluate_arch(arch, train, val, num_classes=k, cfg=pc, device_shared=ex.slots_per_device > 1, resume=resume, keep_state=keep_state)


def over_budget_note(df, s) -> str:
    """'; N over the <limits> limit, never evaluated' when a cost limit is set, else ''."""
    n = int((df.status == "over_budget").sum())
    limits = [f"{k} {v:,}" for k, v in (("params", s.max_decoder_params), ("MACs", s.max_decoder_macs)) if v is not None]
    return f"; {n} over the {' / '.join(limits)} limit, never evaluated" if limits else ""


def _cost(cfg, run):
    """arch -> (params, MACs) of its decoder at the proxy geometry (the feature store's C2..C5
    maps, ``proxy.width``): what the cost constraint compares with its limits."""
    from nasfcos.backbones import LEVELS
    from nasfcos.complexity import decoder_cost
    from storage.features import FeatureStore

    store = FeatureStore.open(run.features)
    chw = [store.levels[lv] for lv in LEVELS]
    geometry = dict(in_channels=[c for c, _, _ in chw], sizes=[(h, w) for _, h, w in chw], width=cfg.proxy.width, num_classes=int(store.attrs["num_classes"]))

    def cost(arch):
        c = decoder_cost(arch, **geometry)
        return c.params, c.macs

    return cost


@task(task_run_name="evaluate {arch_id}")
def evaluate_decoder(config: dict, arch: str, arch_id: str, step: int, sample: int, rung: int = 0, history: list[float] | None = None) -> dict:
    """Train one decoder on the cached features, append its row to results.parquet, return it.

    The task appends the row itself so that a finished evaluation is durable the
    moment it ends, whatever happens to the flow process afterwards; a retry finds
    that row and returns it instead of training the arch again. Under successive halving
    (``search.rungs``) it trains the arch to ``rung`` from the state its lower rung kept
    (``storage.rungs``; ``history``: the rewards of the rungs below) and keeps its own
    state for the next rung before writing the row.
    """
    from prefect.runtime import task_run

    from nasfcos.halving import pack_state, unpack_state
    from nasfcos.search import make_row
    from storage.results import ResultsTable
    from storage.rungs import RungStates

    cfg, run, _, _ = open_stage(config, STAGE)
    table = ResultsTable(run.root)
    if task_run.run_count > 1 and (row := table.get(arch_id)) is not None and max(len(row["rung_epochs"]), 1) > rung:
        return row  # the earlier attempt finished its row, then failed
    rungs, fidelity, states = cfg.search.rungs, {}, RungStates(run.root)
    if rungs:
        epochs = rungs[rung]
        data = states.read(arch_id, rungs[rung - 1]) if rung else None
        if rung and data is None:
            get_run_logger().warning("%s: no state of %d epochs to resume; training %d epochs from scratch", arch_id, rungs[rung - 1], epochs)
        keep = (lambda state: states.write(arch_id, epochs, pack_state(state))) if rung < len(rungs) - 1 else None
        record = proxy_record(cfg, run, arch, epochs=epochs, resume=unpack_state(data) if data else None, keep_state=keep)
        fidelity = {"rungs": rungs[: rung + 1], "history": history or ()}
    else:
        record = proxy_record(cfg, run, arch)
    row = make_row(record, step=step, sample=sample, penalty=cfg.search.failure_penalty, **fidelity)
    table.write_part([row])  # lock-free: only the flow compacts
    if rungs and rung:
        states.drop(arch_id, rungs[rung - 1])  # resumed from: its row and this one are written
    with open(run.root / "evaluations.log", "a") as f:  # audit trail: one line per finished evaluation
        at = f" epochs={record['epochs']}" if rungs else ""
        f.write(f"{datetime.now(timezone.utc).isoformat()} {arch_id} {record['status']} {record['device']} pid={os.getpid()}{at}\n")
    fault_point("search:row")
    get_run_logger().info("%s: %s reward %.4f (%.1f s)", arch_id, record["status"], record["reward"], record["train_seconds"])
    return row


@stage_flow(STAGE)
def search(config: dict | str = "demo") -> dict:
    """Sample, evaluate in parallel, update; until search.total_archs unique archs are scored."""
    from nasfcos.controller import ControllerConfig, build_policy
    from nasfcos.evolution import EvolutionConfig
    from nasfcos.search import SearchConfig, lost_record, run_search, run_search_async
    from storage.results import ResultsTable

    cfg, run, h, done = open_stage(config, STAGE)
    if done:
        return run.manifest(STAGE)["outputs"]
    config = portable(cfg)
    s = cfg.search
    results = ResultsTable(run.root)
    controller = ControllerConfig(lr=s.controller_lr, ppo_epochs=s.ppo_epochs, update=s.controller_update)
    # read only for a fresh search: a resumed one restores its population from controller.pt
    warm = ResultsTable.of(s.warm_start).ok_rewards() if s.policy == "evolution" and s.warm_start and not run.controller.exists() else ()
    evolution = EvolutionConfig(population=s.population, sample_size=s.sample_size)
    policy = build_policy(s.policy, seed=s.seed, config=controller, head=s.head, ops=s.ops, evolution=evolution, warm_start=warm)
    progress = create_progress_artifact(
        progress=100.0 * min(len(results) - results.count("over_budget"), s.total_archs) / s.total_archs,
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
            rung = {"rung": job.rung, "history": [float(v) for v in job.history]} if s.rungs else {}
            return task.submit(config=config, arch=str(job.arch), arch_id=job.arch.arch_id, step=job.step, sample=job.sample, **rung)

    def on_step(info: dict) -> None:
        update_progress_artifact(progress, 100.0 * min(info["unique_archs"], s.total_archs) / s.total_archs)
        if s.plot_every and info["step"] % s.plot_every == 0:  # plots, archs/hour and ETA in the UI and runs/<id>/report/
            from flows.report import stage_plots

            plots = stage_plots(run.root, config, STAGE, logger=get_run_logger(), finished=False)
            create_markdown_artifact(key=artifact_key(cfg, "search"), markdown=f"# {STAGE} (running, step {info['step']})" + plots, description="search progress: plots, archs/hour, ETA")

    limited = s.max_decoder_params is not None or s.max_decoder_macs is not None
    loop = dict(
        policy=policy, results=results, state_path=run.controller, on_step=on_step, cost=_cost(cfg, run) if limited else None,
        cfg=SearchConfig(
            total_archs=s.total_archs, archs_per_step=s.archs_per_step, failure_penalty=s.failure_penalty,
            max_consecutive_failures=s.max_consecutive_failures, lost_after_s=None if timeout is None else timeout + 120,
            max_decoder_params=s.max_decoder_params, max_decoder_macs=s.max_decoder_macs, rungs=tuple(s.rungs or ()), eta=s.eta,
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
    if s.rungs:
        from storage.rungs import RungStates

        RungStates(run.root).clear()  # the search is over: nothing will be promoted again
    df = results.read()
    from flows.report import stage_plots

    create_markdown_artifact(
        key=artifact_key(cfg, "search"),
        markdown=f"# {STAGE}\n\n{summary.unique_archs} unique archs ({int((df.status == 'failed').sum())} failed"
        f"{over_budget_note(df, s)}) in "
        f"{summary.steps} controller steps ({s.policy}, {s.mode}); best reward {summary.best_reward:.4f}:\n\n`{summary.best_arch}`\n\n"
        f"Results: `{run.root / 'results.parquet'}`" + stage_plots(run.root, config, STAGE, logger=get_run_logger()),
        description="search summary",
    )
    out = {"results": str(run.root / "results.parquet"), "unique_archs": summary.unique_archs, "best_reward": summary.best_reward, "best_arch": summary.best_arch}
    run.finish(STAGE, h, out)
    return out
