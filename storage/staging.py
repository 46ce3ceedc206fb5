"""Node-local staging of a feature store: copy it once per machine from the shared filesystem.

In a multi-machine search the feature store (``runs/<id>/features.zarr``, see
:mod:`storage.features`) lives on a shared filesystem, and every evaluation process loads
all of it (once per device). Reading it over the network from every process, and again
from every restarted or added one, multiplies the load on the file server;
:func:`stage_store` instead copies it once to each machine's local disk and hands every
process there the same local copy.

Layout under the local ``root``::

    <name>-<digest16>/              a finished copy of the store (renamed into place whole)
      .staged.json                  completion marker: digest, source, files, bytes, time, pid
    <name>-<digest16>.lock          flock(2) lock taken while that copy is made
    .tmp-<name>-<digest16>-<pid>-<uuid>/   a copy in progress (or left by a killed process)

``<digest16>`` identifies the *content* of the source (paths, sizes and mtimes of its
files), so a store that is repaired or re-materialised after staging gets a new copy
instead of a stale one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import atomicio

__all__ = ["MARKER", "stage_store"]

logger = logging.getLogger(__name__)

# In the copy's root. Zarr opens arrays by path and never reads it; only listing the root
# group's members (which FeatureStore does not do) warns that it is not a Zarr node.
MARKER = ".staged.json"
_TMP_PREFIX = atomicio.TMP_PREFIX  # hidden, and beside a file's temp files
# Threads of one process take a process-level lock per path before flock(2): on file
# systems where the kernel emulates flock with POSIX record locks (NFS, some FUSE) those
# locks are per process, so threads of one process would not exclude each other.
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_LOCK = threading.Lock()


def stage_store(src: str | Path, root: str | Path) -> Path:
    """A local copy of the store directory ``src`` under ``root``, made at most once per node.

    The copy is ``root/<src name>-<digest[:16]>``, where the digest covers the sorted
    (relative path, size, mtime_ns) of every file under ``src``; a changed source therefore
    gets a new directory. If that directory already holds a completion marker with the
    current digest it is returned without copying. Otherwise the caller takes a lock
    (per-path thread lock + ``flock`` on ``root/<name>-<digest16>.lock``), so concurrent
    processes and threads of one machine make one copy and the others wait for it; the copy
    is made in a temp dir, checked (file count and bytes equal the source's, source
    unchanged meanwhile), marked and renamed into place, so a half-made copy is never
    visible under the final name. Temp dirs of this name and digest left by killed
    processes are removed first.

    Copies of other digests are left alone: another process may still be reading one.
    Removing them is the caller's (or the node's clean-up job's) business.

    The source must not be written while it is staged (a materialisation in progress
    changes its digest and the copy is refused). The copy is not fsync'ed: after a machine
    crash, delete ``root`` rather than trust it.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``src`` is not a directory.
        OSError: ``root`` cannot be created or written, the copy differs from the source,
            or the source changed while it was copied (each a one-line message naming
            the paths).
    """
    src = Path(src).absolute()
    if not src.exists():
        raise FileNotFoundError(f"{src}: store to stage does not exist")
    if not src.is_dir():
        raise ValueError(f"{src}: store to stage is not a directory")
    root = Path(root).absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"{root}: staging root cannot be created ({e.strerror})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionError(f"{root}: staging root is not writable")

    digest, files, nbytes = _scan(src)
    name = f"{src.name}-{digest[:16]}"
    dest = root / name
    if _is_complete(dest, digest):
        return dest

    with _lock(root / f"{name}.lock"):
        if _is_complete(dest, digest):  # another process or thread made it while we waited
            return dest
        for stale in root.iterdir():
            if stale.name.startswith(f"{_TMP_PREFIX}{name}-"):
                shutil.rmtree(stale, ignore_errors=True)
        if dest.exists():  # no valid marker: not made by stage_store, or damaged; redo it
            logger.warning("%s: exists without a valid %s; replacing it", dest, MARKER)
            shutil.rmtree(dest)
        tmp = root / f"{_TMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex}"
        start = time.monotonic()
        try:
            _copytree(src, tmp)
            _, got_files, got_bytes = _scan(tmp)
            if (got_files, got_bytes) != (files, nbytes):
                raise OSError(f"staging {src} -> {dest}: copy has {got_files} files / {got_bytes} bytes, source had {files} / {nbytes}")
            if _scan(src)[0] != digest:
                raise OSError(f"staging {src} -> {dest}: source changed while it was copied (is it still being written?)")
            marker = {
                "digest": digest,
                "source": str(src),
                "files": files,
                "bytes": nbytes,
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "pid": os.getpid(),
                "copy_id": tmp.name.rsplit("-", 1)[-1],
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("staged %s: %d bytes, %d files in %.1f s -> %s", src, nbytes, files, time.monotonic() - start, dest)
    return dest


def _copytree(src: Path, dst: Path) -> None:
    """The copy itself (a seam for tests: patching ``shutil.copytree`` would also hit its recursion)."""
    shutil.copytree(src, dst)


def _scan(directory: Path) -> tuple[str, int, int]:
    """(sha256 hex of the sorted (relative path, size, mtime_ns) of every file, file count, bytes).

    The staging marker is skipped, so a finished copy scans like its source.
    """
    entries: list[tuple[str, int, int]] = []
    for dirpath, _, filenames in os.walk(directory, followlinks=True):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            rel = os.path.relpath(path, directory)
            if rel == MARKER:
                continue
            st = os.stat(path)
            entries.append((rel, st.st_size, st.st_mtime_ns))
    entries.sort()
    h = hashlib.sha256()
    for rel, size, mtime_ns in entries:
        h.update(os.fsencode(rel) + b"\0" + f"{size}\0{mtime_ns}\n".encode())
    return h.hexdigest(), len(entries), sum(size for _, size, _ in entries)


def _is_complete(dest: Path, digest: str) -> bool:
    """Whether ``dest`` is a finished copy of the source with ``digest`` (its marker says so)."""
    try:
        return json.loads((dest / MARKER).read_text()).get("digest") == digest
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive across this machine's threads (process lock) and processes (``flock``)."""
    with _THREAD_LOCKS_LOCK:
        local = _THREAD_LOCKS.setdefault(str(path), threading.Lock())
    with local:
        try:
            f = open(path, "a")
        except OSError as e:
            raise OSError(e.errno, f"{path.parent}: staging root is not writable ({e.strerror})") from None
        with f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when f is closed
            yield
