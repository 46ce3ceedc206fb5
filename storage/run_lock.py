"""One run directory, one owner: the run lock.

Two flows driving one run directory would evaluate every arch twice and overwrite
each other's controller checkpoint. The flow process (the ``nas-search`` parent, or
a stage flow run on its own) takes a non-blocking ``flock`` on ``runs/<id>/run.lock``
for as long as it runs; the kernel drops it when that process dies, however it dies,
so a crashed run never leaves a stale lock. A second owner fails at once with one
line naming the holder (written into the lock file). Subflows in the holder's
process re-enter the lock; tasks never take it (they may run on other machines).

Taking the lock also takes the run's next epoch (``storage.run_epoch``), the fencing
token that correctness rests on where ``flock`` does not hold (an NFS mount without
locks grants it on every host) and against a dead flow's tasks: :func:`held_epoch`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from storage import run_epoch

log = logging.getLogger(__name__)

_HELD: dict[str, list] = {}  # lock path -> [open file, depth, epoch]: flock conflicts across fds of one process
_GUARD = threading.Lock()
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunLocked(RuntimeError):
    """The run directory is owned by another live flow."""


def holder_info(owner: str = "") -> dict:
    return {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _describe(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        h = {}
    if not h:
        return "another process (no holder recorded)"
    return f"{h.get('owner') or 'a flow'} on host {h.get('host', '?')} pid {h.get('pid', '?')} since {h.get('since', '?')}"


def held_epoch(root: str | Path) -> int | None:
    """The epoch this process took with the run lock of ``root`` (None: it does not hold it)."""
    with _GUARD:
        entry = _HELD.get(str((Path(root) / "run.lock").resolve()))
    return None if entry is None else entry[2]


@contextmanager
def run_lock(root: str | Path, owner: str = "") -> Iterator[None]:
    """Hold ``root/run.lock`` for the block (re-entrant within this process).

    Raises:
        RunLocked: another process holds it; the message names the holder.
    """
    path = Path(root) / "run.lock"
    key = str(path.resolve())
    with _GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise RunLocked(f"{Path(root)}: run is already running ({_describe(path)}); wait for it to finish or cancel it") from None
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    f.close()
                    raise
                log.warning("%s: this filesystem has no flock (%s); a second run is not refused here, but the run epoch stops the older one's writes", path, e.strerror)
            f.seek(0)
            f.truncate()
            f.write(json.dumps(holder_info(owner)) + "\n")
            f.flush()
            try:
                epoch = run_epoch.take(root, owner)
            except BaseException:
                f.close()
                raise
            _HELD[key] = [f, 1, epoch]
    try:
        yield
    finally:
        with _GUARD:
            _HELD[key][1] -= 1
            if _HELD[key][1] == 0:
                f = _HELD.pop(key)[0]
                f.seek(0)
                f.truncate()  # no stale holder text for the next reader
                f.close()  # releases the flock
