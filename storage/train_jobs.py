"""The durable files of train-full's jobs (issue #29), in ``full/<arch_id>/``:

``job.json``      which flow run trains the arch now (its id, attempt, devices, the epoch of
                  the stage that submitted or adopted it): the stage finds a running job
                  here after its own restart, and a job trains only while it is named here;
``trained.json``  the arch's outcome (the leaderboard's record: ``ok`` or the arch's own
                  ``failed``), written at the end of its training by the job (``job``: its
                  flow run) or the stage's task: the stage reads it from the run directory,
                  not from Prefect's result storage, and a rerun does not start a training
                  group for an arch recorded ``ok``.

A job that is no longer the one named in ``job.json`` (the stage gave up on it and
submitted another: its machine stopped answering, but it may still run) stops at its
next log line or checkpoint instead of writing (:class:`JobFence`).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import atomicio
from storage.run_epoch import Fenced

JOB = "job.json"
TRAINED = "trained.json"


def jobs_uid(full_dir: str | Path) -> str:
    """A random id of this run directory's jobs (``full/jobs.uid``, made once, O_EXCL): part of
    every job's idempotency key, so a run directory deleted and made again (``make demo``
    twice on one Prefect server) never gets an old run's job back."""
    path = Path(full_dir) / "jobs.uid"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(uuid.uuid4().hex[:12] + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path.read_text().strip()


def read_job(arch_dir: str | Path) -> dict | None:
    """The arch's current job (None: never submitted, or a damaged file: the stage then
    submits attempt 0 again, whose key Prefect answers with that attempt's run, which is
    final: one attempt spent, then a new one)."""
    try:
        job = json.loads((Path(arch_dir) / JOB).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return job if isinstance(job, dict) and "flow_run_id" in job else None


def write_job(arch_dir: str | Path, *, flow_run_id: str, attempt: int, key: str, devices: list[str], epoch: int | None) -> dict:
    """Name the arch's current job; :class:`Fenced` when a stage of a newer run epoch already
    named one (this stage's process is a zombie: its successor owns the arch)."""
    held = read_job(arch_dir)
    if held is not None and epoch is not None and (held.get("epoch") or 0) > epoch:
        raise Fenced(f"{arch_dir}: its job was named by run epoch {held['epoch']}, newer than this stage's {epoch}; not renaming it")
    job = {
        "flow_run_id": str(flow_run_id),
        "attempt": attempt,
        "idempotency_key": key,
        "devices": list(devices),
        "epoch": epoch,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    Path(arch_dir).mkdir(parents=True, exist_ok=True)
    atomicio.write_json(Path(arch_dir) / JOB, job)
    return job


def read_trained(arch_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(arch_dir) / TRAINED).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_trained(arch_dir: str | Path, record: dict) -> None:
    atomicio.write_json(Path(arch_dir) / TRAINED, record)


@dataclass(frozen=True)
class JobFence:
    """Called by training before each checkpoint (``train(fence=...)``; picklable, for the
    ranks of a data-parallel job): raises :class:`Fenced` when ``job.json`` names another
    flow run than ``flow_run_id``."""

    arch_dir: str
    flow_run_id: str

    def __call__(self, iteration: int) -> None:
        job = read_job(self.arch_dir)
        if job is not None and job["flow_run_id"] != self.flow_run_id:
            raise Fenced(
                f"{self.arch_dir}: flow run {job['flow_run_id']} (attempt {job['attempt']}) trains this arch now; "
                f"job {self.flow_run_id} stops at iteration {iteration} without writing"
            )
