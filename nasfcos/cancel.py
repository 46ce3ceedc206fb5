"""Stopping a computation from outside its thread: a cancelled search must free every slot
within seconds, and Python cannot interrupt a thread. Whoever runs an evaluation says how
to tell it was cancelled (:func:`watch`: a flow's stop event, a Dask worker's record of
released tasks); the training loop asks (:func:`check`) once per batch, for a cost of a
thread-local lookup, and ends with :class:`Cancelled`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from nasfcos.errors import InfrastructureError

_THREAD = threading.local()


class Cancelled(InfrastructureError):
    """The run stopped this evaluation (a cancel, a stopped flow): no record, nothing to retry."""


@contextmanager
def watch(cancelled: Callable[[], bool]) -> Iterator[None]:
    """Within the block, :func:`check` in this thread raises once ``cancelled()`` is true."""
    outer = getattr(_THREAD, "cancelled", None)
    _THREAD.cancelled = cancelled
    try:
        yield
    finally:
        _THREAD.cancelled = outer


def check() -> None:
    """Raise :class:`Cancelled` when this thread's computation was cancelled."""
    cancelled = getattr(_THREAD, "cancelled", None)
    if cancelled is not None and cancelled():
        raise Cancelled("evaluation cancelled: its search stopped")
