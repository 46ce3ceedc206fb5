"""The run epoch: a fencing token for the owner of a run directory.

``flock`` (the run lock) stops a second flow on one machine, but not on a shared
filesystem mounted ``nolock``/``local_lock`` (it is granted on every host), and never a
dead flow's tasks still running on other machines. So every flow that becomes a run's
owner also takes the next *epoch*: ``runs/<id>/epochs/<n>.json`` created with
``O_CREAT | O_EXCL``, which is atomic on local disks and NFSv3/v4, Lustre, GPFS and
CephFS, with or without locks. The highest number there is the current epoch. The owner
passes its epoch to every task; a task, a compaction or a controller checkpoint of an
older epoch stops with :class:`Fenced` instead of writing (:func:`check`), and part
files carry their epoch in their name, so a zombie's late result is told apart
(``storage.results``). A check-then-write leaves a window of a few microseconds on a
filesystem without compare-and-swap; what lands in it is named and left out by the
readers, never merged.
"""

from __future__ import annotations

import json
import os
import re
import socket
from datetime import datetime, timezone
from pathlib import Path

_NAME = re.compile(r"^(\d{8})\.json$")


class Fenced(RuntimeError):
    """A newer owner has taken the run: this process (or task) must stop writing."""


def directory(root: str | Path) -> Path:
    return Path(root) / "epochs"


def current(root: str | Path) -> int:
    """The run's current epoch (0: no owner has taken one yet)."""
    try:
        names = os.listdir(directory(root))
    except FileNotFoundError:
        return 0
    return max((int(m.group(1)) for n in names if (m := _NAME.match(n))), default=0)


def take(root: str | Path, owner: str = "") -> int:
    """Become the run's owner: create the next epoch's file atomically and return its number.
    Two processes racing for one number: one creates it, the other takes the next."""
    d = directory(root)
    d.mkdir(parents=True, exist_ok=True)
    n = current(root) + 1
    info = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    while True:
        try:
            fd = os.open(d / f"{n:08d}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            n = max(n + 1, current(root) + 1)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"epoch": n, **info}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return n


def holder(root: str | Path, epoch: int) -> str:
    """Who took ``epoch``, in words (for a :class:`Fenced` message)."""
    try:
        h = json.loads((directory(root) / f"{epoch:08d}.json").read_text())
    except (OSError, ValueError):
        return f"epoch {epoch}"
    return f"epoch {epoch} ({h.get('owner') or 'a flow'} on host {h.get('host', '?')} pid {h.get('pid', '?')} since {h.get('since', '?')})"


def check(root: str | Path, epoch: int | None, what: str = "this process") -> None:
    """Raise :class:`Fenced` when ``epoch`` is no longer the run's current one (None: not fenced,
    e.g. a table opened by a reader or a test)."""
    if epoch is None:
        return
    now = current(root)
    if now != epoch:
        raise Fenced(f"{Path(root)}: {what} belongs to epoch {epoch}, but {holder(root, now)} owns the run now; stopping without writing")
