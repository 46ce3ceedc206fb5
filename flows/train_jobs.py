"""train-full as jobs (``train_full.jobs``): each arch is its own flow run of the
``train-arch`` deployment (``flows/train_arch.py``) on a work pool, ``train_full.concurrency``
at a time; the stage submits, watches and gathers them.

- **Idempotent submission.** A job's idempotency key is (run, arch, the stage's config hash,
  attempt): a stage that died between creating a job and naming it in ``job.json``
  submits the same key again and Prefect answers with the job it already made.
- **Re-attach.** The stage's own process may die and come back (a new flow run, a new run
  epoch): it finds each arch's job in ``full/<arch_id>/job.json``, waits for a running
  one (adopting it: its epoch in the file becomes the new owner's), takes a finished one's
  record from ``trained.json`` and never starts a second job for an arch.
- **Attempts.** A job that crashed, failed or was lost without a record is submitted again
  (attempt + 1, ``train_full.job_attempts`` in all) and resumes from the arch's checkpoint;
  an arch's own failure (out of memory, divergence) is its record and is not retried, nor
  is a job a user cancelled (the stage then fails naming it, once the others finish).
  ``job.json`` names the one current job: one it no longer names stops at its next
  checkpoint (``storage.train_jobs.JobFence``).
- **Devices.** On a local process pool the jobs share this machine: each gets its own
  group of ``devices_per_arch`` of ``execution.devices`` (and its share of the cores,
  ``OMP_NUM_THREADS``). A cluster pool's job gets its own machine; the same names then
  mean that machine's devices.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pandas as pd
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from flows.config import PipelineConfig
from flows.placement import run_logger
from flows.stages import StageProgress, stage_hash
from storage.run_dir import RunDir
from storage.run_lock import held_epoch
from storage.train_jobs import jobs_uid, read_job, read_trained, write_job

POLL_S = 2.0


class JobsFailed(RuntimeError):
    """Some archs have no record: their jobs used up their attempts (crashed, lost, a bug) or were cancelled."""


def device_groups(cfg: PipelineConfig) -> list[tuple[str, ...]]:
    """``execution.devices`` in consecutive groups of ``train_full.devices_per_arch``."""
    d, n = cfg.execution.devices, cfg.train_full.devices_per_arch
    return [tuple(d[i : i + n]) for i in range(0, len(d), n)]


def job_env(cfg: PipelineConfig) -> dict[str, str]:
    """Environment of every job: torchrun's restarts; on CPU devices, an equal share of this
    machine's cores per job (as the in-process tasks get, ``flows.placement.share_cpu_threads``)."""
    env = {"NASFCOS_MAX_RESTARTS": str(cfg.execution.max_restarts)}  # every node's torchrun, not only the job's own
    cpus = sum(d == "cpu" for d in cfg.execution.devices)
    if cpus > 1 and not os.environ.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // cpus))
    return env


def job_file(attempt: int) -> str:
    """The training job's file of an attempt (``nasfcos.engine.distributed``): its own name, so
    that the nodes of a multi-node job never start from an earlier attempt's."""
    return f"job-attempt{attempt}.pkl"


def key(cfg: PipelineConfig, run: RunDir, arch_id: str, attempt: int) -> str:
    """Unique on the Prefect server per run directory (``jobs_uid``: a run dir deleted and made
    again, or another runs_dir with the same run_id, gets other keys), arch, config and attempt."""
    return f"{cfg.run_id}/{jobs_uid(run.root / 'full')}/{arch_id}/{stage_hash(cfg, 'train-full')}/attempt{attempt}"


def run_jobs(cfg: PipelineConfig, run: RunDir, todo: pd.DataFrame, config: dict, *, description: str, refresh: Callable[[], None] | None = None) -> list[dict]:
    """Train ``todo``'s archs as jobs; their records in ``todo``'s order."""
    t, log = cfg.train_full, run_logger()
    groups = device_groups(cfg)
    limit = t.concurrency or len(groups)
    env, epoch = job_env(cfg), held_epoch(run.root)
    records: dict[str, dict] = {}
    active: dict[str, dict] = {}  # arch_id -> its job.json
    failed: dict[str, str] = {}  # arch_id -> why its last job ended without a record
    first: dict[str, int] = {}  # arch_id -> its first attempt in this stage run (the budget counts from it)
    rows = {r.arch_id: r for r in todo.itertuples()}
    with get_client(sync_client=True) as client:
        env = {**_deployment_env(client, t.jobs), **env}
        queue = []
        for arch_id, row in rows.items():  # what earlier attempts of this stage left
            job = read_job(run.full(arch_id))
            if (rec := _record(run, row)) is not None and rec["status"] == "ok":
                records[arch_id] = rec  # an arch that failed is trained again, as a rerun's tasks would
                continue
            state = _state(client, job)
            if state is not None and not state.is_final():
                active[arch_id] = write_job(run.full(arch_id), **_fields(job), epoch=epoch)  # adopted by this owner
                log.info("%s: re-attached to its running job %s (attempt %d, %s)", arch_id, job["flow_run_id"], job["attempt"], state.name)
            else:
                queue.append(arch_id)
        with StageProgress(cfg, "train-full", len(rows), done=len(records), description=description, unit="arch", refresh=refresh, every_s=300, logger=log) as progress:
            while queue or active:
                while queue and len(active) < limit:
                    arch_id = queue.pop(0)
                    first.setdefault(arch_id, (read_job(run.full(arch_id)) or {"attempt": -1})["attempt"] + 1)
                    job = _submit(cfg, run, rows[arch_id], config, groups, active, env, epoch, failed, first[arch_id])
                    if job is not None:
                        active[arch_id] = job
                time.sleep(POLL_S)
                for arch_id, job in list(active.items()):
                    state = _state(client, job)
                    if state is not None and not state.is_final():
                        continue
                    del active[arch_id]
                    if (rec := _record(run, rows[arch_id])) is not None and rec.get("job") == job["flow_run_id"]:
                        records[arch_id] = rec
                        progress.advance(1, refresh_soon=True)  # the summary lists it now, not in 5 minutes
                        continue
                    why = f"job {job['flow_run_id']} (attempt {job['attempt']}) ended {state.name if state else 'missing from the server'}" + (
                        f": {state.message}" if state is not None and state.message else ""
                    )
                    failed[arch_id] = why
                    if state is not None and state.is_cancelled():  # a user stopped it: not submitted again
                        log.warning("%s: %s; not submitted again", arch_id, why)
                        continue
                    log.warning("%s: %s without a record; submitting it again", arch_id, why)
                    queue.insert(0, arch_id)
                if active:
                    progress.tick()
    lost = {a: failed[a] for a in rows if a not in records}
    if lost:
        raise JobsFailed(f"train-full: {len(lost)} arch(s) without a record (attempts per stage run: {t.job_attempts}): " + "; ".join(f"{a}: {w}" for a, w in lost.items()))
    return [{k: v for k, v in records[a].items() if k != "job"} for a in rows]


def _submit(cfg, run: RunDir, row, config: dict, groups, active: dict, env: dict, epoch, failed: dict, first: int) -> dict | None:
    """Create (or find again, by its key) the arch's next job and name it in ``job.json``;
    None when the arch has used up this stage run's attempts (counted from ``first``:
    attempt numbers go on across stage runs, so that no key is used twice)."""
    arch_dir = run.full(row.arch_id)
    prev = read_job(arch_dir)
    attempt = 0 if prev is None else prev["attempt"] + 1
    if attempt - first >= cfg.train_full.job_attempts:
        failed.setdefault(row.arch_id, f"job {prev['flow_run_id']} was the last of {cfg.train_full.job_attempts} attempt(s)")
        return None
    busy = {tuple(j["devices"]) for j in active.values()}
    devices = next((g for g in groups if g not in busy), groups[len(active) % len(groups)])
    k = key(cfg, run, row.arch_id, attempt)
    try:
        fr = run_deployment(
            cfg.train_full.jobs,
            parameters={"config": config, "arch": row.arch, "arch_id": row.arch_id, "kind": row.kind, "devices": list(devices), "attempt": attempt},
            timeout=0,
            idempotency_key=k,
            tags=[f"run:{cfg.run_id}", f"arch:{row.arch_id}"],
            # the job file's path: the other nodes of a multi-node job wait for it (deployments/torchrun-node.sh)
            job_variables={"env": {**env, "NASFCOS_JOB_FILE": str(arch_dir / job_file(attempt))}},
            flow_run_name=f"{cfg.run_id} · train {row.arch_id}",
        )
    except ObjectNotFound:  # deleted since the stage started
        raise ValueError(f"train_full.jobs: deployment {cfg.train_full.jobs!r} is gone from the Prefect server") from None
    # a key made before (a stage that died before naming its job) returns that run, with the devices it was given then
    devices = list((fr.parameters or {}).get("devices") or devices)
    run_logger().info("%s: job %s submitted (attempt %d, %s)", row.arch_id, fr.id, attempt, ", ".join(devices))
    return write_job(arch_dir, flow_run_id=str(fr.id), attempt=attempt, key=k, devices=devices, epoch=epoch)


def _deployment_env(client, name: str) -> dict:
    """The deployment's own ``env`` job variable: a run's ``env`` replaces it whole, so the
    jobs' environment starts from it."""
    try:
        return dict((client.read_deployment_by_name(name).job_variables or {}).get("env") or {})
    except ObjectNotFound:
        raise ValueError(
            f"train_full.jobs: no deployment {name!r} on this Prefect server; deploy it (`prefect deploy --prefect-file deployments/prefect.yaml`) or set train_full.jobs: null"
        ) from None


def _state(client, job: dict | None):
    """The Prefect state of ``job``'s flow run (None: no job, or the server forgot it)."""
    if job is None:
        return None
    try:
        return client.read_flow_run(job["flow_run_id"]).state
    except ObjectNotFound:
        return None


def _record(run: RunDir, row) -> dict | None:
    """The arch's record (ok, or the arch's own failure; ``job``: the job that wrote it, absent
    when a stage task did)."""
    rec = read_trained(run.full(row.arch_id))
    return rec if rec is not None and rec.get("arch") == row.arch else None


def _fields(job: dict) -> dict:
    return {"flow_run_id": job["flow_run_id"], "attempt": job["attempt"], "key": job["idempotency_key"], "devices": job["devices"]}
