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
submitted another) stops at its next checkpoint instead of writing (:class:`JobFence`):
two processes never train one arch into one directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import atomicio
from storage.run_epoch import Fenced

JOB = "job.json"
TRAINED = "trained.json"


def read_job(arch_dir: str | Path) -> dict | None:
    """The arch's current job (None: never submitted). A damaged file is None: the stage
    then submits again under the same idempotency key (Prefect answers with the same run)."""
    try:
        job = json.loads((Path(arch_dir) / JOB).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return job if isinstance(job, dict) and "flow_run_id" in job else None


def write_job(arch_dir: str | Path, *, flow_run_id: str, attempt: int, key: str, devices: list[str], epoch: int | None) -> dict:
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
