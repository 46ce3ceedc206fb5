"""Stage 3, ``search`` (paper §3.3): the controller samples decoders, each is scored on the
proxy task on a device slot (``flows.dispatch``: a thread of this process or a Dask
worker), PPO updates the controller.

The loop itself is ``nasfcos.search.sync`` (``search.mode: sync``) or
``nasfcos.search.asynchronous`` (``async``: an evaluation submitted per freed slot); this
flow gives it the evaluations (:func:`evaluate_decoder`) and reports progress. Every
record lands in ``results.parquet`` as it finishes; the controller checkpoint makes the
stage resumable after a crash without evaluating any arch twice.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from flows import feature_cache
from flows.config import PipelineConfig, load_config
from flows.dispatch import make_dispatch
from flows.placement import device_slot, forget_device, last_device, run_logger
from flows.stages import artifact_key, publish_summary, stage_flow
from nasfcos.fault_injection import fault_point
from storage.run_dir import RunDir
from storage.run_lock import held_epoch

PROGRESS_EVERY_S = 2.0  # the search's progress artifact is updated at most this often

STAGE = "search"


def proxy_record(cfg, run, arch: str, *, epochs: int | None = None, resume: dict | None = None, keep_state=None, alone: bool = False) -> dict:
    """``arch`` trained and scored on the proxy task (``nasfcos.engine.proxy.evaluate_arch``) on
    a device slot, with this process's cached features: the search's evaluations and the
    baselines' proxy rewards (train-full) are computed alike. ``epochs`` (default
    ``proxy.epochs``), ``resume``, ``keep_state``: a rung of successive halving. ``alone``:
    the whole device (an evaluation that ran out of memory beside others, run again); only
    then is an out-of-memory the arch's fault (a failed row), otherwise it is raised."""
    from nasfcos.engine.proxy import ProxyConfig, evaluate_arch

    p, ex = cfg.proxy, cfg.execution
    epochs = p.epochs if epochs is None else epochs
    pc = ProxyConfig(
        width=p.width, lr=p.lr, batch_size=p.batch_size, epochs=epochs, ema_decay=p.ema_decay, eval_batch_size=p.batch_size, seed=p.seed, reward=cfg.search.reward
    )  # fmt: skip
    with device_slot(ex, shared=not alone) as device:
        train, val, k = feature_cache.splits((str(run.features), device, p.size_range_scale, ex.feature_residency, ex.stage_features))
        return evaluate_arch(arch, train, val, num_classes=k, cfg=pc, device_shared=not alone, resume=resume, keep_state=keep_state)


def over_budget_note(df, s) -> str:
    """'; N over the <limits> limit, never evaluated' when a cost limit is set, else ''."""
    n = int((df.status == "over_budget").sum())
    limits = [f"{k} {v:,}" for k, v in (("params", s.max_decoder_params), ("MACs", s.max_decoder_macs)) if v is not None]
    return f"; {n} over the {' / '.join(limits)} limit, never evaluated" if limits else ""


def _cost(cfg, run):
    """arch -> (params, MACs) of its decoder at the proxy geometry (the feature store's C2..C5
    maps, ``proxy.width``): what the cost constraint compares with its limits."""
    from nasfcos.model.backbones import LEVELS
    from nasfcos.model.complexity import decoder_cost
    from storage.features import FeatureStore

    store = FeatureStore.open(run.features)
    chw = [store.levels[lv] for lv in LEVELS]
    geometry = dict(in_channels=[c for c, _, _ in chw], sizes=[(h, w) for _, h, w in chw], width=cfg.proxy.width, num_classes=int(store.attrs["num_classes"]))

    def cost(arch):
        c = decoder_cost(arch, **geometry)
        return c.params, c.macs

    return cost


def evaluate_decoder(
    config: dict, arch: str, arch_id: str, step: int, sample: int, rung: int = 0, history: list[float] | None = None, epoch: int | None = None, alone: bool = False
) -> dict:
    """Train one decoder on the cached features, append its row to results.parquet, return it
    (with ``worker``: where it ran, for the search's per-worker failure budget). Runs
    wherever ``flows.dispatch`` puts it: a thread of the flow process or a Dask worker.

    Exactly once: it first looks for the arch's row (an earlier attempt, or a dispatch of a
    flow that died, may have written it) and returns that instead of training again; an
    evaluation of an ``epoch`` that is no longer the run's (a newer flow owns it) stops
    before training and before writing (``storage.run_epoch.Fenced``). The row is durable
    the moment the evaluation ends, whatever happens to the flow process afterwards.
    Whatever else it raises leaves as ``nasfcos.errors.EvaluationLost`` naming the worker:
    the loop dispatches the arch again (``search.max_attempts``), alone when it ran out of
    memory beside other evaluations (``alone``: it has the device to itself now). Under
    successive halving (``search.rungs``) it trains the arch to ``rung`` from the state its
    lower rung kept (``storage.rung_states``; ``history``: the rewards of the rungs below)
    and keeps its own state for the next rung before writing the row.
    """
    from nasfcos.errors import EvaluationLost, is_infrastructure, one_line
    from storage.results import ResultsTable
    from storage.run_epoch import Fenced, check

    runner = config["execution"]["task_runner"] if isinstance(config, dict) else ""
    forget_device()  # a failure before this evaluation borrows a device is no device's
    try:
        fault_point(f"search:evaluate:{sample}")  # the kill matrix holds one sample here (finishing order)
        cfg, run = _opened(config)
        check(run.root, epoch, f"the evaluation of {arch_id}")
        if (table := _TABLES.get((run.root, epoch))) is None:  # not `or`: a table's truth is its length (a whole read)
            table = _TABLES[(run.root, epoch)] = ResultsTable(run.root, epoch=epoch)
        if (row := _row_of(table, arch_id, rung)) is not None:
            run_logger().info("%s: already has its row (an earlier attempt or dispatch wrote it); not evaluated again", arch_id)
            return {**row, "worker": _worker_name(runner)}
        row = _evaluate(cfg, run, table, arch, arch_id, step, sample, rung, history, alone)
    except Fenced as e:
        run_logger().warning("%s: %s", arch_id, e)  # in the worker's log: its flow may be gone
        raise
    except Exception as e:  # noqa: BLE001 - named, classed and passed on to the loop's budgets
        oom = type(e).__name__ == "OutOfMemoryError" and not alone
        kind = "contention" if oom else "infrastructure" if is_infrastructure(e) else "error"
        raise EvaluationLost(one_line(e), _worker_name(runner), kind) from e
    fault_point("search:row")
    return {**row, "worker": _worker_name(runner)}


_OPENED: dict[str, tuple] = {}  # the config's JSON -> (config, run dir): parsed once per process
_TABLES: dict[tuple, object] = {}  # (run dir, epoch) -> its ResultsTable: files read once per process (its row checks)


def _opened(config: dict | str):
    """The validated config and run dir of an evaluation, parsed once per process (a worker
    evaluates thousands of archs of one search)."""
    key = config if isinstance(config, str) else json.dumps(config, sort_keys=True, default=str)
    if key not in _OPENED:
        cfg = load_config(config) if isinstance(config, str) else PipelineConfig.model_validate(config)
        _OPENED[key] = (cfg, RunDir.at(cfg.runs_dir, cfg.run_id))
    return _OPENED[key]


def _evaluate(cfg, run, table, arch: str, arch_id: str, step: int, sample: int, rung: int, history, alone: bool) -> dict:
    """The evaluation itself: proxy training (at a rung), its row written as a part, the audit line."""
    from nasfcos.search.halving import pack_state, unpack_state
    from nasfcos.search.rows import make_row
    from storage.rung_states import RungStates

    rungs, fidelity, states = cfg.search.rungs, {}, RungStates(run.root)
    if rungs:
        epochs = rungs[rung]
        data = states.read(arch_id, rungs[rung - 1]) if rung else None
        if rung and data is None:
            run_logger().warning("%s: no state of %d epochs to resume; training %d epochs from scratch", arch_id, rungs[rung - 1], epochs)
        keep = (lambda state: states.write(arch_id, epochs, pack_state(state))) if rung < len(rungs) - 1 else None
        record = proxy_record(cfg, run, arch, epochs=epochs, resume=unpack_state(data) if data else None, keep_state=keep, alone=alone)
        fidelity = {"rungs": rungs[: rung + 1], "history": history or ()}
    else:
        record = proxy_record(cfg, run, arch, alone=alone)
    row = make_row(record, step=step, sample=sample, penalty=cfg.search.failure_penalty, **fidelity)
    fault_point("search:write")  # the cluster tests hold a trained evaluation here while its flow is replaced
    if (first := _row_of(table, arch_id, rung)) is not None:
        run_logger().warning("%s: another evaluation of it wrote its row first (this one was counted lost); that row stands", arch_id)
        return first  # the loop learns the reward the table keeps
    table.write_part([row])  # lock-free: only the flow compacts; fenced when a newer flow owns the run
    if rungs and rung:
        states.drop(arch_id, rungs[rung - 1])  # resumed from: its row and this one are written
    with open(run.root / "evaluations.log", "a") as f:  # audit trail: one line per finished evaluation
        at = f" epochs={record['epochs']}" if rungs else ""
        f.write(f"{datetime.now(timezone.utc).isoformat()} {arch_id} {record['status']} {record['device']} pid={os.getpid()}{at}\n")
    return row  # the loop logs it, in the flow's log


def _row_of(table, arch_id: str, rung: int) -> dict | None:
    """The arch's row when one of ``rung`` (or higher) is written: its evaluation is done."""
    row = table.get(arch_id)
    return row if row is not None and max(len(row["rung_epochs"]), 1) > rung else None


def _worker_name(task_runner: str) -> str:
    """Where this task ran, as the failure budget counts it: the Dask worker's address, or
    (thread runner) the device it borrowed."""
    if task_runner == "dask":
        from distributed import get_worker

        try:
            return get_worker().address
        except ValueError:  # not in a worker (a test calling the task's function)
            pass
    return last_device()


def _policy(cfg, run):
    """The search policy ``search.policy`` names, with its settings from the config."""
    from nasfcos.search.controller import ControllerConfig
    from nasfcos.search.evolution import EvolutionConfig
    from nasfcos.search.policies import build_policy
    from storage.results import ResultsTable

    s = cfg.search
    controller = ControllerConfig(lr=s.controller_lr, ppo_epochs=s.ppo_epochs, update=s.controller_update)
    # read only for a fresh search: a resumed one restores its population from controller.pt
    warm = ResultsTable.of(s.warm_start).ok_rewards() if s.policy == "evolution" and s.warm_start and not run.controller.exists() else ()
    evolution = EvolutionConfig(population=s.population, sample_size=s.sample_size)
    return build_policy(s.policy, seed=s.seed, config=controller, head=s.head, ops=s.ops, evolution=evolution, warm_start=warm)


def _loop_config(cfg):
    """The search loop's settings (``nasfcos.search.loop.SearchConfig``) from the config."""
    from nasfcos.search.loop import SearchConfig

    s, timeout = cfg.search, cfg.execution.timeouts.search
    return SearchConfig(
        total_archs=s.total_archs, archs_per_step=s.archs_per_step, failure_penalty=s.failure_penalty,
        max_consecutive_failures=s.max_consecutive_failures, max_attempts=s.max_attempts, lost_after_s=timeout,
        max_decoder_params=s.max_decoder_params, max_decoder_macs=s.max_decoder_macs, rungs=tuple(s.rungs or ()), eta=s.eta,
    )  # fmt: skip


class _Progress:
    """The search's progress in the UI: its progress artifact (archs evaluated out of
    ``search.total_archs``, at most every :data:`PROGRESS_EVERY_S`: an API call each) and,
    every ``search.plot_every`` steps, its plots."""

    def __init__(self, cfg, run, config: dict, results) -> None:
        self.cfg, self.run, self.config, self.s = cfg, run, config, cfg.search
        done = len(results) - results.count("over_budget")
        self.progress = create_progress_artifact(
            progress=100.0 * min(done, self.s.total_archs) / self.s.total_archs,
            key=artifact_key(cfg, "search-progress"),
            description=f"archs evaluated out of {self.s.total_archs}",
        )
        self.reported = 0.0

    def on_step(self, info: dict) -> None:
        s = self.s
        if time.monotonic() - self.reported >= PROGRESS_EVERY_S or info["unique_archs"] >= s.total_archs:
            update_progress_artifact(self.progress, 100.0 * min(info["unique_archs"], s.total_archs) / s.total_archs)
            self.reported = time.monotonic()
        if self.cfg.execution.report and s.plot_every and info["step"] % s.plot_every == 0:  # plots, archs/hour and ETA in the UI and runs/<id>/report/
            from flows.report.page import stage_plots

            plots = stage_plots(self.run.root, self.config, STAGE, logger=get_run_logger(), finished=False)
            create_markdown_artifact(
                key=artifact_key(self.cfg, "search"), markdown=f"# {STAGE} (running, step {info['step']})" + plots, description="search progress: plots, archs/hour, ETA"
            )


@stage_flow(STAGE)
def search(cfg, run, config: dict) -> dict:
    """Sample, evaluate in parallel, update; until search.total_archs unique archs are scored."""
    from nasfcos.search.asynchronous import run_search_async
    from nasfcos.search.sync import run_search
    from storage.results import ResultsTable
    from storage.run_epoch import check

    epoch = held_epoch(run.root)
    s, results = cfg.search, ResultsTable(run.root, epoch=epoch)
    results.compact()  # the owner's takeover: rows of earlier owners merged, later ones of theirs left out
    progress = _Progress(cfg, run, config, results)
    limited = s.max_decoder_params is not None or s.max_decoder_macs is not None
    loop = dict(
        policy=_policy(cfg, run), results=results, state_path=run.controller, on_step=progress.on_step,
        cost=_cost(cfg, run) if limited else None, cfg=_loop_config(cfg), fence=lambda: check(run.root, epoch, "this search flow"),
    )  # fmt: skip
    dispatch = make_dispatch(cfg, evaluate_decoder, {"config": config, "epoch": epoch})
    loop["drain"] = dispatch.drain
    stopped = True
    try:
        if s.mode == "async":  # evaluate_decoder writes its row before it returns
            summary = run_search_async(submit=dispatch.submit, slots=dispatch.slots, evaluator_writes_rows=True, **loop)
        else:
            summary = run_search(evaluate=dispatch.evaluate, **loop)
        stopped = False
    finally:  # evaluations still running stop; the cached features must not hold memory during full training
        dispatch.close(cancel=stopped)
    if s.rungs:
        from storage.rung_states import RungStates

        RungStates(run.root).clear()  # the search is over: nothing will be promoted again
    df = results.read()
    text = (
        f"{summary.unique_archs} unique archs ({int((df.status == 'failed').sum())} failed{over_budget_note(df, s)}) in "
        f"{summary.steps} controller steps ({s.policy}, {s.mode}); best reward {summary.best_reward:.4f}:\n\n`{summary.best_arch}`\n\n"
        + (f"Drained for failing {s.max_consecutive_failures} evaluations in a row: {', '.join(f'`{w}`' for w in summary.drained)}\n\n" if summary.drained else "")
        + f"Results: `{run.root / 'results.parquet'}`"
    )
    publish_summary(cfg, run, STAGE, "search", text, "search summary")
    return {"results": str(run.root / "results.parquet"), "unique_archs": summary.unique_archs, "best_reward": summary.best_reward, "best_arch": summary.best_arch}
