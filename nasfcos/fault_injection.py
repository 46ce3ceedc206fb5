"""Fault points: kill or hold the process on entering a named point (tests only).

The kill-matrix and lock tests need to stop a real pipeline process at a chosen
place. ``NASFCOS_FAULT`` holds rules separated by ``;``:

    <point>=kill          SIGKILL this process the first time it reaches ``fault_point("<point>")``
    <point>=kill:<path>   ... unless ``<path>`` exists, creating it first: once across restarts
                          (torchrun restarts a killed rank, which reaches the point again)
    <point>#N=kill        ... the N-th time (1-based)
    <point>=wait:<path>   create ``<path>.reached``, then wait until ``<path>`` exists (10 min at most)
    <point>=touch:<path>  create ``<path>`` (with ``wait:`` on another point: one task waits for another)
    <point>=raise:<text>  raise ``RuntimeError(<text>)`` (a sick GPU: "CUDA error: ..." is the machine's)
    <point>=oom:<text>    raise ``torch.OutOfMemoryError(<text>)`` (an arch too big for its devices)

``<point>`` may be a glob (``search:evaluate:*``); ``#*`` matches every time.
``NASFCOS_FAULT_FILE`` names a file holding the rules instead, read at every fault point,
so a test changes the rules of a running process (a Dask worker started once per module).

Unset (always, outside tests) a fault point costs two dict lookups.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

_SEEN: Counter = Counter()
WAIT_S = 600.0  # the longest a wait: rule holds
_LOCK = threading.Lock()


def fault_point(name: str) -> None:
    spec = os.environ.get("NASFCOS_FAULT")
    if not spec and (path := os.environ.get("NASFCOS_FAULT_FILE")):
        try:
            spec = Path(path).read_text()
        except FileNotFoundError:
            return
    if not spec:
        return
    with _LOCK:
        _SEEN[name] += 1
        n = _SEEN[name]
    for rule in filter(None, (r.strip() for r in spec.replace("\n", ";").split(";"))):
        point, _, action = rule.partition("=")
        point, _, nth = point.partition("#")
        if not fnmatch.fnmatchcase(name, point) or (nth != "*" and n != int(nth or 1)):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("kill:"):
            try:  # O_EXCL: of processes racing here, one kills itself
                os.close(os.open(action[5:], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("wait:"):
            path = Path(action[5:])
            Path(f"{path}.reached").touch()
            deadline = time.monotonic() + WAIT_S
            while not path.exists():
                if time.monotonic() > deadline:  # a test that went wrong fails, never hangs
                    raise TimeoutError(f"NASFCOS_FAULT: {path} did not appear within {WAIT_S:.0f} s (rule {rule!r})")
                time.sleep(0.05)
        elif action.startswith("touch:"):
            Path(action[6:]).touch()
        elif action.startswith("raise:"):
            raise RuntimeError(action[6:])
        elif action.startswith("oom:"):
            import torch

            raise torch.OutOfMemoryError(action[4:])
        else:
            raise ValueError(f"NASFCOS_FAULT: unknown action {action!r} in rule {rule!r}")
