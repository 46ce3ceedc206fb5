"""Failure classes: whose fault an error is decides what a weeks-long search does with it.

*Arch failures* are the architecture's: a non-finite loss, an arch that does not fit the
device when it has the device to itself, any other error from building or training it.
They are recorded (a ``failed`` row with the error and the penalty reward) and never
retried: the same arch and seed would fail the same way.

*Infrastructure failures* are the machine's: CUDA/cuDNN/NCCL errors, out of memory while
other evaluations share the device, host out of memory, I/O errors (a full disk, a lost
mount), a lost connection, a task past its timeout. They are re-raised, so the task is
retried (Prefect ``retry_condition_fn``) and the loop resubmits the arch; the arch is
never marked failed for them. docs/operations.md "Failure and recovery" has the whole table.
"""

from __future__ import annotations

import torch

# Messages of RuntimeErrors that come from the device or its driver, not from the model.
_DEVICE_ERRORS = (
    "CUDA error", "CUDA driver", "cuDNN error", "CUDNN_STATUS", "CUBLAS_STATUS", "NCCL", "illegal memory access",
    "device-side assert", "ECC error", "no CUDA-capable device", "CUDA-capable device(s) is/are busy",
    # a data-parallel peer lost, as gloo reports it to the survivors
    "Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport", "Timed out waiting",
)  # fmt: skip


class InfrastructureError(RuntimeError):
    """Raised where code knows the fault is the machine's (e.g. a lost evaluation)."""


class EvaluationLost(InfrastructureError):
    """An evaluation that ended without a record, with where it ran (``worker``: a Dask
    worker's address or a device) and ``kind``: ``infrastructure`` (retried, counted against
    the worker and the arch), ``contention`` (out of memory beside other evaluations: run
    again alone before the arch is blamed) or ``error`` (a bug: not retried in place).
    The search loop's failure budgets count per worker and per arch from these fields."""

    def __init__(self, message: str, worker: str = "", kind: str = "infrastructure") -> None:
        super().__init__(message, worker, kind)
        self.message, self.worker, self.kind = message, worker, kind

    def __str__(self) -> str:
        return self.message


def one_line(error: BaseException | str, *, with_type: bool = True, limit: int = 500) -> str:
    """The one-line form of an error, for a results row, a log line, a CLI message or a
    data error naming its file: ``Type: message`` (``with_type=False``: the message alone;
    an empty message: the type), its lines joined (libjpeg, json and CUDA errors span
    lines), at most ``limit`` characters. An error re-raised from a DataLoader worker is
    reduced to the worker's own last line, the one that says what went wrong."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        text = text.split(": ", 1)[1] if ": " in text else text
    text = " ".join(text.split())
    name = type(error).__name__ if isinstance(error, BaseException) else ""
    if with_type and name:
        text = f"{name}: {text}" if text else name
    return (text or name)[:limit]


def is_infrastructure(exc: BaseException, *, device_shared: bool = False) -> bool:
    """Whether ``exc`` is an infrastructure failure (see the module docstring).
    ``device_shared``: other evaluations ran on the same device, so an out-of-memory
    error may be theirs as much as this arch's."""
    if isinstance(exc, EvaluationLost):
        return exc.kind == "infrastructure"
    if isinstance(exc, torch.OutOfMemoryError):
        return device_shared
    if isinstance(exc, (InfrastructureError, TimeoutError, OSError, MemoryError, ConnectionError)):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _DEVICE_ERRORS)
