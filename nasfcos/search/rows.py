"""The results.parquet rows the search writes and reads back: an evaluation's row, the rows
of archs no evaluation scored (over the cost budget; lost too often), the record of a lost
evaluation, and which row is best."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from nasfcos.arch import Arch
from nasfcos.errors import EvaluationLost, one_line


def make_row(record: dict, *, step: int, sample: int, penalty: float, rungs: Sequence[int] | None = None, history: Sequence[float] = ()) -> dict:
    """A results.parquet row from an evaluation record (``nasfcos.engine.proxy.evaluate_arch``):
    adds the step, the sample index, the arch's columns and ``reward_used`` (the penalty
    when failed).

    Fidelity columns: under successive halving ``rungs`` are the epochs of the rungs the
    arch has now completed (the last is this evaluation's) and ``history`` its rewards
    at the ones below; otherwise one rung of the record's ``epochs`` (when it has them).
    """
    row = dict(record)
    row.update(step=step, sample=sample, **Arch.parse(row["arch"]).columns())
    row["reward_used"] = row["reward"] if row["status"] == "ok" else penalty
    if rungs is not None:
        if len(history) != len(rungs) - 1:
            raise ValueError(f"make_row: {len(history)} rewards of lower rungs for rungs {list(rungs)}")
        row.update(epochs=rungs[-1], rung_epochs=list(rungs), rung_rewards=[*history, row["reward"]])
    elif "epochs" in row:
        row.update(rung_epochs=[row["epochs"]], rung_rewards=[row["reward"]])
    return row


def lost_record(arch_id: str, exc: BaseException) -> dict:
    """What an evaluator yields for an evaluation that raised (infrastructure failure):
    where it ran and whether it should run again alone (``nasfcos.errors.EvaluationLost``)."""
    error = one_line(exc, with_type=not isinstance(exc, EvaluationLost))  # its message names the original error's type
    return {"arch_id": arch_id, "status": "lost", "error": error, "worker": getattr(exc, "worker", ""), "alone": getattr(exc, "kind", "") == "contention"}


def worker_of(record: dict) -> str:
    """Where an evaluation ran: its ``worker`` (removed from the record: rows do not hold it),
    else its device."""
    return record.pop("worker", None) or record.get("device", "")


def attempts_row(arch: Arch, attempts: Sequence[str], *, step: int, sample: int, penalty: float) -> dict:
    """The ``failed`` row of an arch lost ``search.max_attempts`` times, naming every attempt."""
    error = f"lost {len(attempts)} times: " + "; ".join(f"[{i}] {a}" for i, a in enumerate(attempts, 1))
    return _unevaluated_row(arch, "failed", one_line(error, with_type=False, limit=2000), params=-1, macs=-1, step=step, sample=sample, penalty=penalty)


def over_budget_row(arch: Arch, *, params: int, macs: int, reason: str, step: int, sample: int, penalty: float) -> dict:
    """The results.parquet row of an arch the cost constraint kept from being evaluated."""
    return _unevaluated_row(arch, "over_budget", reason, params=params, macs=macs, step=step, sample=sample, penalty=penalty)


def _unevaluated_row(arch: Arch, status: str, error: str, *, params: int, macs: int, step: int, sample: int, penalty: float) -> dict:
    """A results.parquet row the loop writes for an arch no evaluation scored (no losses, no times)."""
    now = datetime.now(timezone.utc)
    nan = float("nan")
    return {
        "arch_id": arch.arch_id, "arch": str(arch), "reward": nan, "loss_cls": nan, "loss_reg": nan, "loss_ctr": nan,
        "params": int(params), "macs": int(macs), "train_seconds": 0.0, "eval_seconds": 0.0, "peak_mem_mb": nan,
        "device": "", "seed": -1, "status": status, "error": error, "started_at": now, "finished_at": now,
        "step": step, "sample": sample, "reward_used": penalty, **arch.columns(),
    }  # fmt: skip


def reward_of(row: dict, penalty: float) -> float:
    """What the policy learns from a row: its reward, or the penalty when it failed."""
    return row["reward"] if row["status"] == "ok" else penalty


def rungs_reached(row: dict) -> int:
    """Rungs a results row has completed (at least 1: rows without fidelity columns count as one)."""
    return max(len(row.get("rung_epochs", ())), 1)


def best_row(known: dict[str, dict]) -> dict | None:
    """The best ok row: the most rungs first (successive halving: the best at the highest
    fidelity), then the reward; ties: smallest arch_id."""
    ok = {a: r for a, r in known.items() if r["status"] == "ok"}
    best = max(sorted(ok), key=lambda a: (rungs_reached(ok[a]), ok[a]["reward"]), default=None)
    return None if best is None else ok[best]
