"""The ``train-arch`` flow: one arch's full training as a job of its own, a flow run of a
deployment on a work pool (``train_full.jobs``), submitted by the train-full stage
(``flows/train_jobs.py``). Its process is created by the pool's worker: a local process,
a Kubernetes Job, a SLURM allocation (``deployments/``).

It trains only while ``full/<arch_id>/job.json`` names its flow run (``storage.train_jobs``),
resumes from the arch's checkpoint, and leaves its record in ``full/<arch_id>/trained.json``
for the stage.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.placement import run_logger
from flows.stages import open_stage
from flows.train_full import STAGE, arch_info, train_on
from flows.train_jobs import job_file
from nasfcos.engine.distributed import launch_from_env
from storage.run_epoch import Fenced
from storage.train_jobs import JobFence, read_job, write_trained

PROGRESS_EVERY_S = 30.0  # the job's progress artifact, from its TensorBoard curves
NAMED_WITHIN_S = 300.0  # the stage writes job.json right after creating the run; a worker takes seconds to start it


def _name() -> str:
    p = flow_run.parameters or {}
    config = p.get("config")
    run_id = config.get("run_id", "?") if isinstance(config, dict) else config
    return f"{run_id} · train {p.get('arch_id', '?')}"


@flow(name="train-arch", flow_run_name=_name, log_prints=True)
def train_arch(config: dict[str, Any] | str, arch: str, arch_id: str, kind: str = "searched", devices: list[str] | None = None, attempt: int = 0) -> dict:
    """Train one arch of a run's train-full stage (resumable) and record the outcome.

    Args:
        config: the stage's config (a dict; or a preset name / YAML path by hand).
        arch, arch_id, kind: the arch as ``top_k.parquet`` (``kind``: searched / baseline).
        devices: this job's devices as its process names them (None: the first
            ``train_full.devices_per_arch`` of ``execution.devices``).
        attempt: which submission of the arch's job this is (0, 1, ...).
    """
    cfg, run, _, _ = open_stage(config, STAGE)
    devices = list(devices or cfg.execution.devices[: cfg.train_full.devices_per_arch])
    # the job's process owns only its devices (a baseline's proxy scoring borrows from them too)
    cfg = cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"devices": tuple(devices)})})
    arch_dir, me = run.full(arch_id), str(flow_run.id)
    _wait_until_named(arch_dir, me, attempt)
    logging.getLogger("nasfcos").setLevel(logging.INFO)  # the training's lines (resume, iterations, ETA) in the job's log
    for stale in arch_dir.glob("job-attempt*.pkl"):  # earlier attempts' job files (left by a lost group)
        if stale.name != job_file(attempt):
            stale.unlink(missing_ok=True)
    log = run_logger()
    log.info("%s: training on %s (job %s)", arch_id, ", ".join(devices), me)
    info = arch_info(cfg, run, arch, arch_id, kind)
    with _progress(cfg, arch_dir, arch_id):
        record = train_on(cfg, run, info, devices, fence=JobFence(str(arch_dir), me), launch=launch_from_env())
    JobFence(str(arch_dir), me)(record["iteration"])  # replaced while finishing: the newer job writes the record
    write_trained(arch_dir, record | {"job": me})
    return record


def _wait_until_named(arch_dir, me: str, attempt: int) -> None:
    """Start only as the arch's current job: a run the stage gave up on (or a copy started
    by hand) must not train into the arch's directory. The stage names a job right after
    creating it, so a job may start a moment before it is named."""
    t0 = time.monotonic()
    while (job := read_job(arch_dir)) is None or job["flow_run_id"] != me:
        if (job is not None and job["attempt"] > attempt) or time.monotonic() - t0 > NAMED_WITHIN_S:
            named = f"flow run {job['flow_run_id']} (attempt {job['attempt']})" if job else "no job"
            raise Fenced(f"{arch_dir}: {named} is this arch's job, not {me} (attempt {attempt}); stopping without training")
        time.sleep(1.0)


@contextmanager
def _progress(cfg, arch_dir, arch_id: str, every_s: float = PROGRESS_EVERY_S):
    """The job's progress artifact (``<run_id>-train-<arch_id>-progress``, the iterations its
    curves reached), updated every ``every_s`` from a thread while the block trains."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from flows.stages import artifact_key
    from storage.curves import read_curves

    total = cfg.train_full.iterations

    def reached() -> float:
        steps = read_curves(arch_dir).get("loss/total") or [(0, 0.0)]
        return 100.0 * min(steps[-1][0], total) / total

    art = create_progress_artifact(progress=reached(), key=artifact_key(cfg, f"train-{arch_id}-progress"), description=f"{arch_id}: iterations trained out of {total}")
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            try:
                update_progress_artifact(art, reached())
            except Exception as e:  # noqa: BLE001 - a view: the training is what counts
                run_logger().warning("%s: progress not updated: %s", arch_id, e)

    thread = threading.Thread(target=watch, name=f"progress-{arch_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        update_progress_artifact(art, reached())
