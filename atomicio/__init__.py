"""atomicio: the one way nasfcos writes a file that must survive a crash.

Every durable file of a run (results and their parts, manifests, rung states,
checkpoints, controller state, detections, the report) is written here: to a hidden
temp file in the same folder (``.tmp-<name>.<random>``), fsynced, renamed over the
target, then the folder is fsynced, so a reader sees the old file or the new one,
never a partial one, and the rename survives a power cut. The file gets the
permissions of an ordinary ``open()`` under the process umask (``mkstemp`` alone
would make it 0600 and hide a run's results from its teammates).

A writer killed mid-write leaves its temp file behind: :func:`remove_orphans`
deletes those, by age when other writers may be writing (a young temp file may
be in progress), or all of a file's when its one writer starts again.

Standard library only: both ``nasfcos`` (checkpoints, detections) and ``storage``
(everything else) import it, and neither may import the other.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["ORPHAN_AGE_S", "TMP_PREFIX", "remove_orphans", "write_bytes", "write_json", "write_text", "write_via_path", "write_with"]

TMP_PREFIX = ".tmp-"
ORPHAN_AGE_S = 3600.0  # a temp file this old has no writer left
_UMASK_LOCK = threading.Lock()


def write_with(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Atomically create or replace ``path`` with what ``write(f)`` writes to the binary file ``f``
    (e.g. ``lambda f: torch.save(obj, f)``). On any error the target is left as it was."""

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return write_via_path(path, fill)


def write_via_path(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """The one atomic write, for writers that take a file name (``safetensors``' ``save_file``,
    ``torch.onnx.export``; :func:`write_with` for those that take a file): ``write(tmp)``
    fills the temp file ``tmp`` (same folder and suffix as ``path``), which is then given
    ``open()``'s permissions, fsynced and renamed. On any error the target is left as it
    was and the temp file removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            os.fsync(fd)  # on disk before the rename makes it the file
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_with(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """JSON with sorted keys (diffable manifests); values JSON cannot hold become ``str``."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


def remove_orphans(folder: str | os.PathLike, *, name: str = "", older_than: float = ORPHAN_AGE_S) -> int:
    """Delete temp files of killed writers in ``folder``: those of file ``name`` (all
    files' when empty) last modified more than ``older_than`` seconds ago (0: all of
    them, for a file with one writer that is starting again). A named file's temp files
    include those nasfcos wrote before this module, ``<name>XXXX.tmp``. Returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    cutoff = time.time() - older_than
    removed = 0
    patterns = [f"{TMP_PREFIX}{name}.*", f"{name}*.tmp"] if name else [f"{TMP_PREFIX}*"]
    for tmp in (p for pattern in patterns for p in folder.glob(pattern)):
        with contextlib.suppress(FileNotFoundError):
            if older_than <= 0 or tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
    return removed


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:  # elsewhere: set and restore it, serialised between this module's threads
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; not every filesystem lets a folder be fsynced."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
