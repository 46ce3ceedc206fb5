"""``results.parquet``: one row per architecture sampled by the search (paper §3.1, §4.1).

Every architecture the controller samples is scored on the proxy task and
recorded here, failures included; this table is the search's memory ("an arch
already in results.parquet is never trained again") and what users query with
pandas::

    from storage.results import ResultsTable
    df = ResultsTable("runs/demo").read()            # always complete
    df.groupby("n_deform_fpn").reward.describe()
    df = pandas.read_parquet("runs/demo/results.parquet")   # complete after compact()

On-disk layout of a run directory::

    results.parquet          the compacted table, one row per arch_id, sorted; its metadata
                             names the epoch that last compacted it (sealed)
    results.parts/*.parquet  one file per append() / write_part() not yet compacted, named
                             e<epoch>-... by writers of an epoch, ...=<arch_id>.parquet when
                             it holds one arch's rows (a row check reads only that arch's parts)
    results.compacting       O_EXCL lock file of append() and compact(), naming its holder
    results.fenced/          parts of a superseded owner's tasks, moved aside by the owner
    quarantine/              damaged files, moved aside by the owner's compaction

**One compactor, many writers.** Evaluation tasks, on this machine or others
sharing the run directory, call :meth:`ResultsTable.write_part`: a new uniquely
named file, no lock, no read of the table, so a result is durable the moment its
evaluation ends and a shared filesystem needs no working ``flock``. Only the
run's owner (the flow of the current run epoch, ``storage.run_epoch``) calls
:meth:`~ResultsTable.append` and :meth:`~ResultsTable.compact`; their lock is a process
lock plus ``results.compacting`` created with ``O_EXCL``, which holds on NFS where
``flock`` may be granted to everyone; a holder of an older epoch, or a dead process on
this host, is broken. A table opened without an epoch never compacts a run that has an
owner. What the filesystem must give: a rename within a directory is atomic, ``O_EXCL``
creation is, and a file renamed into place is complete when others see it (POSIX local
disks, NFSv3/v4, Lustre, GPFS, CephFS).

**Fencing.** A writer of an epoch no longer current stops before writing a part
(``run_epoch.Fenced``). A part written in the instant between its check and its write
carries its old epoch in its name; the new owner's first compaction sealed the table with
its own epoch, so readers leave such a part out (naming it) and the owner moves it to
``results.fenced/``. A compaction that broke a superseded owner's lock keeps the parts it
merged until a compaction at least :data:`DEFER_S` later finds its own table in place, so
that owner, stalled between its last check and its rename for less than that, cannot lose
a row by renaming an older merge over (one renamed over is merged again).

**Reading.** :meth:`ResultsTable.read` returns the compacted file plus all
parts (but fenced ones), deduplicated. Readers never move or delete a file: a damaged one
is named and left out, an I/O error (``ESTALE``, ``EMFILE``) is retried, then raised. ``pandas.read_parquet(run_dir / "results.parquet")``
alone sees every row only after :meth:`ResultsTable.compact` (the search loop
compacts at the end of each step).

**Dedup rule** (one row per ``arch_id``). Only the arch's rows that reached the
most rungs count (successive halving writes a row per rung, each with the rewards
of the rungs below: the table keeps the highest fidelity; rows without rungs count
as one). Those are ordered by content - ``(step, sample, finished_at, started_at,
seed, device, reward_used, error)`` - never by file order, so the answer does not
depend on which process appended first or on when compaction ran:

- if any row is ``ok``, the *first* ``ok`` row is kept (a result, once
  obtained, is never overwritten, and a failed row is replaced by any ok row);
- otherwise the *last* row is kept (``failed``: the latest attempt's error;
  ``over_budget``: an arch the cost constraint kept from being evaluated).

``append`` also skips a row whose arch already has an ``ok`` row of as many rungs
(in the table or earlier in the same batch), checked under the lock; ``write_part`` does not
check (it takes no lock), so an arch evaluated twice by a retried task may have
two rows on disk, and the content order above picks the same one at every read.

**Crash safety.** Each file is written to a temporary name, fsynced and
renamed into place, so readers never see a partial file. ``compact``
writes the merge of the table and the parts it listed, renames it over
``results.parquet`` and only then deletes those parts (a part written meanwhile
is not among them and stays). A crash before the rename leaves the old table
and the parts (nothing lost; the orphan temp file is removed by a later compact
once it is ``atomicio.ORPHAN_AGE_S`` old, since a lock-free writer may still be
writing a young one); a crash after it leaves rows both in the table and in
parts, which the dedup rule above collapses to the same row (nothing
duplicated) and the next compact deletes. A crash leaves ``results.compacting``
behind; the next owner (a newer epoch) or the next compaction on this host breaks it. Readers take no lock: they read the
parts first and the table last, and a part deleted in between was renamed
into the table before it was deleted, so it is in the table they read.

This module must not import ``nasfcos`` (dependency direction).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import atomicio
from storage import run_epoch

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Schema. Every row holds RECORD_FIELDS and DECODED_FIELDS; the latter are the arch
# string's analysis columns, decoded by the caller (nasfcos.arch.Arch.columns): storage
# does not know the search space, it stores what it is given.

_STR, _INT, _FLOAT, _TS = pa.string(), pa.int64(), pa.float64(), pa.timestamp("us", tz="UTC")
_STR_LIST, _INT_LIST, _FLOAT_LIST = pa.list_(pa.string()), pa.list_(pa.int64()), pa.list_(pa.float64())

_DECODED: list[tuple[str, pa.DataType, str]] = [
    ("fpn_kind", _STR, "'fcos' (hand-designed FPN of FCOS), 'fcos-deform' (Deformable-FPN-FCOS) or 'searched' (7 blocks)"),
    ("fpn_ops", _STR_LIST, "14 op names, op1 and op2 of each block in order; [] for 'fcos'"),
    ("fpn_aggs", _STR_LIST, "7 aggregation names (psum/cat); [] for 'fcos'"),
    ("fpn_inputs", _INT_LIST, "14 pool ids, id1 and id2 of each block (0-3 = C2-C5, 4+ = block outputs)"),
    ("head_kind", _STR, "'fcos', 'seq' or 'dag'"),
    ("head_ops", _STR_LIST, "seq: its ops; dag: op0 then op1, op2 of each block; [] for 'fcos'"),
    ("head_aggs", _STR_LIST, "dag: 5 aggregation names; [] otherwise"),
    ("head_inputs", _INT_LIST, "dag: 10 pool ids, id1 and id2 of each block; [] otherwise"),
    ("head_layers", _INT, "number of head layers (the range of share)"),
    ("share", _INT, "first head layer whose weights are shared across P3-P7 (§3.2.3)"),
    ("n_deform_fpn", _INT, "deformable 3x3 convs in the FPN"),
    ("n_skip_fpn", _INT, "skip connections in the FPN"),
    ("n_cat_fpn", _INT, "concat aggregations in the FPN"),
    ("n_deform_head", _INT, "deformable 3x3 convs in the head"),
    ("n_skip_head", _INT, "skip connections in the head"),
    ("n_cat_head", _INT, "concat aggregations in the head"),
]
_RECORD_AFTER: list[tuple[str, pa.DataType, str]] = [
    ("step", _INT, "search step (controller update index)"),
    ("sample", _INT, "index of the arch within its step"),
    ("status", _STR, "'ok', 'failed' (its evaluation failed) or 'over_budget' (above search.max_decoder_macs/params: never evaluated)"),
    ("reward", _FLOAT, "proxy-task reward (search.reward: negative validation loss, or meta-val AP); NaN when failed"),
    ("reward_used", _FLOAT, "reward fed to the controller (the penalty for failed archs); finite"),
    ("loss_cls", _FLOAT, "proxy validation focal loss (NaN if unknown)"),
    ("loss_reg", _FLOAT, "proxy validation box-regression loss (NaN if unknown)"),
    ("loss_ctr", _FLOAT, "proxy validation centerness loss (NaN if unknown)"),
    ("params", _INT, "decoder parameters at the proxy width (-1 if unknown)"),
    ("macs", _INT, "decoder multiply-accumulates at the proxy input size (-1 if unknown)"),
    ("train_seconds", _FLOAT, "wall time of proxy training"),
    ("eval_seconds", _FLOAT, "wall time of proxy evaluation"),
    ("peak_mem_mb", _FLOAT, "peak accelerator (or host) memory in MiB (NaN if unknown)"),
    ("device", _STR, "device the arch was scored on, e.g. 'cuda:0'"),
    ("seed", _INT, "seed of the proxy run"),
    ("error", _STR, "'' when ok, else the error message"),
    ("started_at", _TS, "UTC start time"),
    ("finished_at", _TS, "UTC finish time"),
    # schema 2 (successive halving); optional in rows, defaults for rows written before
    ("epochs", _INT, "proxy epochs behind reward: the highest rung reached (-1 if unknown)"),
    ("rung_epochs", _INT_LIST, "proxy epochs of each rung the arch completed, ascending ([epochs] without successive halving)"),
    ("rung_rewards", _FLOAT_LIST, "its reward at each of those rungs (NaN where that evaluation failed); the last is reward"),
]
# Fields a row may leave out, with the value it then gets (also for files of schema 1).
OPTIONAL_DEFAULTS: dict[str, Any] = {"epochs": -1, "rung_epochs": [], "rung_rewards": []}
_FIELDS = [("arch_id", _STR, "12-hex sha1 of arch"), ("arch", _STR, "canonical arch string")] + _DECODED + _RECORD_AFTER

SCHEMA_VERSION = "2"
SCHEMA: pa.Schema = pa.schema(
    [pa.field(n, t, nullable=False, metadata={"doc": d}) for n, t, d in _FIELDS],
    metadata={"nasfcos.results.schema_version": SCHEMA_VERSION},
)
DECODED_FIELDS: tuple[str, ...] = tuple(n for n, _, _ in _DECODED)
RECORD_FIELDS: tuple[str, ...] = ("arch_id", "arch") + tuple(n for n, _, _ in _RECORD_AFTER if n not in OPTIONAL_DEFAULTS)
OPTIONAL_FIELDS: tuple[str, ...] = tuple(OPTIONAL_DEFAULTS)
FIELD_DOCS: dict[str, str] = {n: d for n, _, d in _FIELDS}
STATUSES = ("ok", "failed", "over_budget")

# results.parquet's schema metadata: the epoch whose owner last compacted it (storage.run_epoch).
SEALED_KEY = b"nasfcos.results.sealed_epoch"
_PART_EPOCH = re.compile(r"^e(\d{8})-")
COMPACT_WAIT_S = 30.0  # the longest compact()/append() waits for another live holder of results.compacting
DEFER_S = 60.0  # after breaking a superseded owner's lock, merged parts stay at least this long (see compact)
READ_TRIES = 4  # reads of one file after I/O errors (ESTALE, EMFILE) before the error is raised

# Content order of an arch's rows for the dedup rule (see module docstring).
_ORDER_KEYS = ["step", "sample", "finished_at", "started_at", "seed", "device", "reward_used", "error"]


def arch_id_of(canonical: str) -> str:
    """The 12-hex-digit id of a canonical arch string (same hash as ``nasfcos.arch.Arch.arch_id``)."""
    return hashlib.sha1(canonical.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------
# Row validation.


def validate_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Check a row dict and return it normalised, in schema order.

    ``row`` must hold exactly :data:`RECORD_FIELDS` and :data:`DECODED_FIELDS`
    (``nasfcos.arch.Arch.columns``), optionally plus any of :data:`OPTIONAL_FIELDS`
    (else :data:`OPTIONAL_DEFAULTS`).
    Ints accept Python/NumPy integers, floats also accept integers, timestamps
    must be timezone-aware ``datetime``s (stored in UTC). Raises ``ValueError``
    naming the first bad field.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"row: expected a dict, got {type(row).__name__}")
    unknown = sorted(set(row) - set(RECORD_FIELDS) - set(DECODED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown field (known: {', '.join((*RECORD_FIELDS, *DECODED_FIELDS, *OPTIONAL_FIELDS))})")
    missing = [f for f in (*RECORD_FIELDS, *DECODED_FIELDS) if f not in row]
    if missing:
        raise ValueError(f"{missing[0]}: missing field")

    out: dict[str, Any] = {}
    for f in (*RECORD_FIELDS, *DECODED_FIELDS):
        out[f] = _coerce(f, SCHEMA.field(f).type, row[f])
    for f, default in OPTIONAL_DEFAULTS.items():
        out[f] = _coerce(f, SCHEMA.field(f).type, row.get(f, default))

    if not out["arch"].startswith("fpn="):  # e.g. a preset name: rows hold the canonical string
        raise ValueError(f"arch: {out['arch']!r} is not a canonical arch string fpn=...;head=...;share=N")
    expected_id = arch_id_of(out["arch"])
    if out["arch_id"] != expected_id:
        raise ValueError(f"arch_id: {out['arch_id']!r} is not the id of arch {out['arch']!r} ({expected_id})")

    if out["status"] not in STATUSES:
        raise ValueError(f"status: {out['status']!r} not one of {STATUSES}")
    if not math.isfinite(out["reward_used"]):
        raise ValueError(f"reward_used: {out['reward_used']!r} must be finite (it is fed to the controller)")
    if out["status"] == "ok":
        if not math.isfinite(out["reward"]):
            raise ValueError(f"reward: {out['reward']!r} must be finite when status is 'ok'")
        if out["error"]:
            raise ValueError(f"error: must be '' when status is 'ok', got {out['error']!r}")
    elif not out["error"]:
        raise ValueError("error: a failed row needs an error message")
    for f in ("step", "sample"):
        if out[f] < 0:
            raise ValueError(f"{f}: {out[f]} must be >= 0")
    rungs, rewards = out["rung_epochs"], out["rung_rewards"]
    if len(rungs) != len(rewards):
        raise ValueError(f"rung_rewards: {len(rewards)} rewards for {len(rungs)} rung_epochs")
    if rungs and (rungs != sorted(set(rungs)) or out["epochs"] != rungs[-1]):
        raise ValueError(f"rung_epochs: {rungs} must increase and end at epochs ({out['epochs']})")
    if rungs and out["status"] == "ok" and rewards[-1] != out["reward"]:
        raise ValueError(f"rung_rewards: the last ({rewards[-1]!r}) must be the reward ({out['reward']!r})")
    return {f: out[f] for f in SCHEMA.names}


def _coerce(f: str, t: pa.DataType, v: Any) -> Any:
    if t == _STR:
        if not isinstance(v, str):
            raise ValueError(f"{f}: expected str, got {type(v).__name__} {v!r}")
        return v
    if t == _INT:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{f}: expected int, got {type(v).__name__} {v!r}")
        return int(v)
    if t == _FLOAT:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{f}: expected float, got {type(v).__name__} {v!r}")
        return float(v)
    if t in (_STR_LIST, _INT_LIST, _FLOAT_LIST):
        if not isinstance(v, (list, tuple, np.ndarray)):
            raise ValueError(f"{f}: expected a list, got {type(v).__name__} {v!r}")
        return [_coerce(f, t.value_type, x) for x in v]
    if t == _TS:
        if not isinstance(v, datetime) or v is pd.NaT:
            raise ValueError(f"{f}: expected a timezone-aware datetime, got {type(v).__name__} {v!r}")
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError(f"{f}: {v!r} is naive; give a timezone-aware (UTC) datetime")
        return v.astimezone(timezone.utc)
    raise AssertionError(f"{f}: no coercion for {t}")  # pragma: no cover - schema and code disagree


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Validate rows and build an Arrow table with :data:`SCHEMA`."""
    valid = [validate_row(r) for r in rows]
    return pa.Table.from_pylist(valid, schema=SCHEMA)


# --------------------------------------------------------------------------
# Files.


def write_parquet(data: pa.Table | pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a table (or DataFrame, without its index) to ``path`` as parquet, atomically."""
    if isinstance(data, pd.DataFrame):
        data = pa.Table.from_pandas(data, preserve_index=False)
    atomicio.write_bytes(path, _table_bytes(data))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _table_bytes(table: pa.Table, sealed: int = 0) -> bytes:
    """Parquet bytes; ``sealed``: the epoch of the compaction writing ``results.parquet``."""
    table = table.replace_schema_metadata({**SCHEMA.metadata, **({SEALED_KEY: str(sealed).encode()} if sealed else {})})
    buf = io.BytesIO()
    pq.write_table(table, buf, write_page_checksum=True)  # CRC per page, verified on read
    return buf.getvalue()


# --------------------------------------------------------------------------
# The table.

# The in-process half of ResultsTable._lock, per run dir (the file half is results.compacting).
_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_LOCK = threading.Lock()


class ResultsTable:
    """The results of one search run: ``run_dir/results.parquet`` (+ uncompacted parts).

    Args:
        run_dir: the run directory; created on the first :meth:`append`.

    Safe for several processes at once: :meth:`write_part` needs no lock (tasks on
    any machine), :meth:`append` and :meth:`compact` serialise on ``results.compacting``
    (the run's owner), readers take no lock and never move a file. ``epoch``: the run epoch
    the table writes for (parts carry it; a superseded writer stops); a table without one
    that compacts a run with owners takes the run lock (and an epoch) first. See the module
    docstring for the dedup rule, fencing and the crash-safety argument.
    """

    def __init__(self, run_dir: str | os.PathLike, *, epoch: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.epoch = epoch  # the run epoch this table writes for (storage.run_epoch); None: a reader
        self.path = self.run_dir / "results.parquet"
        self.parts_dir = self.run_dir / "results.parts"
        self.lock_path = self.run_dir / "results.compacting"
        self._ok_cache: dict[tuple, dict[str, int]] = {}  # see _ok_ids
        self._read_cache: dict[tuple, pa.Table] = {}  # see _reader_files
        self._ids: dict[tuple, set[str]] = {}  # see get
        self._reader_lock = threading.Lock()
        self._lock_key = str(self.lock_path.resolve())  # this process's lock for the run dir
        self._named: set[str] = set()  # files already named in a warning by this reader
        self._broke: int | None = None  # the epoch of a superseded holder whose compaction lock _lock() broke
        self._deferred: list[Path] = []  # parts merged while such a holder may still rename (see compact)
        self._deferred_at = 0.0  # when (time.monotonic)

    def __repr__(self) -> str:
        return f"ResultsTable({str(self.run_dir)!r})"

    @classmethod
    def of(cls, path: str | os.PathLike) -> "ResultsTable":
        """The table of an existing run: ``path`` is its ``results.parquet`` or its run directory."""
        path = Path(path)
        run_dir = path.parent if path.name == "results.parquet" else path
        table = cls(run_dir)
        if not table.path.exists() and not table._part_paths():
            raise FileNotFoundError(f"{path}: no results.parquet (nor uncompacted parts) there")
        return table

    # ------------------------------------------------------------- writing
    def write_part(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Validate ``rows`` and write them as one new part file, lock-free; return the count.

        For evaluation tasks on any machine (see "One compactor, many writers"): no
        lock and no duplicate check, so a row for an arch that already has one may
        be written; the dedup rule keeps the first ``ok`` row at every read and
        compact. A bad row writes nothing.
        """
        table = _rows_table(rows)
        if table.num_rows:
            self._write_part(table)
        return table.num_rows

    def append(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Validate ``rows`` and add them as one atomic part file; return how many were written.

        A row is skipped when its arch already has an ``ok`` row of as many rungs
        (in the table or earlier in ``rows``); a failed arch may be appended again, and
        an arch promoted by successive halving gets its row of the higher rung. All rows
        are validated before anything is written, so a bad row writes none.
        """
        table = _rows_table(rows)
        if table.num_rows == 0:
            return 0
        with self._lock():
            done = self._ok_ids()
            keep = []
            ids, statuses, rungs = table.column("arch_id").to_pylist(), table.column("status").to_pylist(), _rungs(table).to_pylist()
            for i, (aid, st, n) in enumerate(zip(ids, statuses, rungs, strict=True)):
                if done.get(aid, 0) >= n:
                    continue
                keep.append(i)
                if st == "ok":
                    done[aid] = n
            if not keep:
                return 0
            self._write_part(table.take(keep))
        return len(keep)

    def _write_part(self, table: pa.Table) -> None:
        """A new part, named by its epoch, time, host, pid and a random id: unique across
        machines. A writer of an epoch no longer current stops here (``run_epoch.Fenced``)."""
        run_epoch.check(self.run_dir, self.epoch, "this result")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
        epoch = "" if self.epoch is None else f"e{self.epoch:08d}-"
        ids = set(table.column("arch_id").to_pylist())
        one = next(iter(ids)) if len(ids) == 1 else ""
        arch = f"={one}" if _ARCH_ID.fullmatch(one) else ""  # a part of one arch is named for it: see _part_arch
        atomicio.write_bytes(self.parts_dir / f"{epoch}{stamp}-{host}-{os.getpid()}-{uuid.uuid4().hex}{arch}.parquet", _table_bytes(table))

    def compact(self) -> int:
        """Merge all parts into ``results.parquet`` (deduplicated, sorted); return the row count.

        Afterwards ``pandas.read_parquet(run_dir / "results.parquet")`` holds
        every row. Also creates an empty ``results.parquet`` for an empty run
        and removes temp files left by writers that crashed.
        """
        if self.epoch is None and run_epoch.current(self.run_dir):  # only an owner compacts a run that has owners: become one
            from storage.run_lock import held_epoch, run_lock

            with run_lock(self.run_dir, "ResultsTable.compact"):  # refused while a flow runs; re-entered inside one
                return ResultsTable(self.run_dir, epoch=held_epoch(self.run_dir)).compact()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            run_epoch.check(self.run_dir, self.epoch, "this compaction")
            # Lock-free writers may be writing a young temp file; an old one is an orphan.
            for d in (self.run_dir, self.parts_dir):
                atomicio.remove_orphans(d)
            parts = self._part_paths()
            main, sealed = self._read_main(owner=True)
            if self._deferred and (self.epoch is None or sealed != self.epoch):
                log.warning("%s: replaced by a compaction of epoch %d (a superseded owner's, stalled before its rename); merged again", self.path, sealed)
                self._deferred_at = time.monotonic()  # and kept a while longer
            elif self._deferred and time.monotonic() - self._deferred_at >= DEFER_S:  # our merge survived long enough
                _delete_parts(self._deferred)
                parts = [p for p in parts if p not in self._deferred]
                self._deferred = []
            seal = sealed if self.epoch is None else max(sealed, self.epoch)
            if not parts and main is not None and seal == sealed:
                return main.num_rows
            fenced = [p for p in parts if _fenced(p, sealed)]
            for p in fenced:  # a dead owner's task finished after the run changed hands
                self._move_aside(p, "results.fenced", f"written by a task of epoch {_part_epoch(p)} after epoch {sealed} took the run; left out")
            tables = [t for p in parts if p not in fenced and (t := self._read_or_quarantine(p)) is not None]
            if main is not None:
                tables.append(main)
            merged = _dedup(pa.concat_tables(tables) if tables else SCHEMA.empty_table())
            run_epoch.check(self.run_dir, self.epoch, "this compaction")  # again: a newer owner may have come meanwhile
            atomicio.write_bytes(self.path, _table_bytes(merged, sealed=seal))
            # Only after the rename: the merged parts' rows are now in the table. Unless this
            # compaction broke a superseded owner's lock: that owner may still rename its older
            # merge over ours, so the parts stay until our next compaction finds our table intact.
            merged_parts = [p for p in parts if p not in fenced]
            if self._broke is not None:
                self._deferred, self._deferred_at, self._broke = merged_parts, time.monotonic(), None
            elif self._deferred:
                _delete_parts([p for p in merged_parts if p not in self._deferred])
            else:
                _delete_parts(merged_parts)
            return merged.num_rows

    # ------------------------------------------------------------- reading
    def table(self) -> pa.Table:
        """All rows as an Arrow table (one per arch_id, sorted by step, sample, arch_id)."""
        tables = self._reader_tables()
        return _dedup(pa.concat_tables(tables) if tables else SCHEMA.empty_table())

    def _reader_tables(self) -> list[pa.Table]:
        return [t for _, t in self._reader_files()]

    def _reader_files(self) -> list[tuple[tuple, pa.Table]]:
        """(cache key, rows) of every file's rows as a reader sees them: parts (those of a superseded epoch left
        out), then the compacted file. Each file is read once per (name, inode, mtime, size):
        parts never change once renamed in, the compacted file only by a rename, so an
        evaluation's row checks (two per arch, on a worker that keeps this table) read only
        what is new since its last one. A part's name is unique (host, pid, random id) and
        never reused, so a part already read is not even looked at again."""
        with self._reader_lock:  # one table serves every evaluation thread of a process
            return self._reader_files_locked()

    def _reader_files_locked(self, arch_id: str | None = None) -> list[tuple[tuple, pa.Table]]:
        """With ``arch_id``: only the files that may hold its rows (parts named for another
        arch are not read: a worker's row check would otherwise read every part of every
        worker, O(workers) reads per evaluation)."""
        cache, self._read_cache = self._read_cache, {}
        if arch_id is not None:  # what a full read would keep stays cached for the next one
            self._read_cache = {k: t for k, t in cache.items() if _part_arch(k[0]) not in (None, arch_id)}

        def read(path: Path, *, part: bool = False) -> tuple[tuple, pa.Table] | None:
            if part and (key := (path.name,)) in cache:
                t = cache[key]
            else:
                try:  # opened, not stat'ed: on NFS an open revalidates the attributes a stat may serve from cache
                    with open(path, "rb") as f:
                        st = os.fstat(f.fileno())
                except FileNotFoundError:  # a part compacted away meanwhile: its rows are in the table
                    return None
                key = (path.name,) if part else (path.name, st.st_ino, st.st_mtime_ns, st.st_size)
                t = cache[key] if key in cache else self._read_for_reader(path)
            if t is None:
                return None
            self._read_cache[key] = t
            return key, t

        # Parts first, the compacted file last: a part that vanishes between
        # listing and reading was merged into the file before it was deleted.
        paths = [p for p in self._part_paths() if arch_id is None or _part_arch(p.name) in (None, arch_id)]
        parts = [(p, *kt) for p in paths if (kt := read(p, part=True)) is not None]
        main = read(self.path) if self.path.exists() else None
        sealed = int((main[1].schema.metadata or {}).get(SEALED_KEY, b"0")) if main is not None else 0
        files = [(k, t) for p, k, t in parts if not self._left_out(p, sealed)]
        return files + ([main] if main is not None else [])

    def read(self) -> pd.DataFrame:
        """All rows as a DataFrame, one per arch_id, sorted by (step, sample); list columns hold arrays."""
        return self.table().to_pandas()

    def __len__(self) -> int:
        return self.table().num_rows

    def count(self, status: str) -> int:
        """Rows of ``status`` (e.g. ``over_budget``: archs the cost constraint kept from being evaluated)."""
        t = self.table()
        return int(pc.sum(pc.equal(t.column("status"), status)).as_py() or 0)

    def contains(self, arch_id: str, *, ok_only: bool = False) -> bool:
        """Whether ``arch_id`` has a row (with ``ok_only``: an ``ok`` row, i.e. needs no retry)."""
        row = self.get(arch_id)
        return row is not None and (not ok_only or row["status"] == "ok")

    def get(self, arch_id: str) -> dict[str, Any] | None:
        """The row of ``arch_id`` as a dict of Python values (lists, UTC datetimes), or None."""
        with self._reader_lock:
            files, ids = self._reader_files_locked(arch_id), {}
            for key, t in files:  # each file's arch ids, kept as long as the file is: a lookup per file, not a filter
                ids[key] = self._ids.get(key) or set(t.column("arch_id").to_pylist())
            self._ids = ids
        hits = [t.filter(pc.equal(t.column("arch_id"), arch_id)) for key, t in files if arch_id in ids[key]]
        hit = _dedup(pa.concat_tables(hits)) if hits else None  # the dedup rule is per arch: its own rows suffice
        return hit.to_pylist()[0] if hit is not None else None

    def history(self) -> pd.DataFrame:
        """Per search step: evaluated samples, ok samples, mean/max reward and the best reward so far.

        Columns: ``step, n, n_ok, mean_reward, max_reward, best_reward,
        mean_reward_used``. Rewards are over ``ok`` rows (NaN for a step with
        none; ``best_reward`` carries the previous best); ``mean_reward_used``
        includes the penalties of failed ones; ``over_budget`` rows (never
        evaluated) are left out.
        """
        df = self.read()
        df = df[df["status"] != "over_budget"]
        cols = ["step", "n", "n_ok", "mean_reward", "max_reward", "best_reward", "mean_reward_used"]
        if df.empty:
            return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("step", "n", "n_ok") else "float64") for c in cols})
        ok = df["status"] == "ok"
        reward = df["reward"].where(ok)
        g = df.assign(_ok=ok.astype("int64"), _r=reward).groupby("step", sort=True)
        out = pd.DataFrame(
            {
                "n": g.size(),
                "n_ok": g["_ok"].sum(),
                "mean_reward": g["_r"].mean(),
                "max_reward": g["_r"].max(),
                "mean_reward_used": g["reward_used"].mean(),
            }
        )
        out["best_reward"] = out["max_reward"].cummax().ffill()
        return out.reset_index()[cols]

    def ok_rewards(self) -> list[tuple[str, float]]:
        """(arch, reward_used) of every ``ok`` row, oldest first (by step, sample): what an
        evolution search warm-starts its population from (``search.warm_start``)."""
        df = self.read()
        df = df[df["status"] == "ok"]
        return list(zip(df["arch"].tolist(), df["reward_used"].astype(float).tolist(), strict=True))

    def top_k(self, k: int = 20) -> pd.DataFrame:
        """The ``k`` best ``ok`` archs by reward (descending; ties by arch_id ascending), with ``rank`` 1..k.

        Under successive halving archs that reached more rungs rank first (ASHA's answer is the
        best at the highest fidelity: a 3-epoch reward is not comparable with a 15-epoch one)."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
            raise ValueError(f"k: expected an int >= 0, got {k!r}")
        df = self.read()
        df = df[df["status"] == "ok"]
        df = df.assign(_rungs=[max(len(r), 1) for r in df["rung_epochs"]]).sort_values(["_rungs", "reward", "arch_id"], ascending=[False, False, True], kind="stable")
        df = df.drop(columns="_rungs").head(int(k)).reset_index(drop=True)
        df.insert(0, "rank", np.arange(1, len(df) + 1, dtype="int64"))
        return df

    def write_top_k(self, path: str | os.PathLike, k: int = 20) -> pd.DataFrame:
        """Write :meth:`top_k` to ``path`` (``top_k.parquet``) atomically and return it."""
        df = self.top_k(k)
        schema = pa.schema([pa.field("rank", _INT, nullable=False)] + list(SCHEMA), metadata=SCHEMA.metadata)
        write_parquet(pa.Table.from_pandas(df, schema=schema, preserve_index=False), path)
        return df

    # ------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """This process's lock for the run dir, then ``results.compacting``, made complete
        with its holder's name and linked into place (``link`` fails when the name exists:
        atomic on NFS too, where ``flock`` may be a no-op, and never an empty lock file). A
        holder of an older epoch (its owner was superseded) or a dead process on this host
        is broken; a live one is waited for up to :data:`COMPACT_WAIT_S`."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with _PROCESS_LOCKS_LOCK:
            local = _PROCESS_LOCKS.setdefault(self._lock_key, threading.Lock())
        with local:
            me = {"epoch": self.epoch, "host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
            deadline = time.monotonic() + COMPACT_WAIT_S
            while not self._create_lock(json.dumps(me)):
                holder = _read_json(self.lock_path)
                if holder is None:  # released meanwhile
                    continue
                if self._stale(holder) and self._break_lock(holder):
                    if holder.get("epoch") is not None and holder["epoch"] != self.epoch:
                        self._broke = holder["epoch"]
                    log.warning("%s: broke the compaction lock of %s (superseded or dead)", self.lock_path, holder)
                    continue
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.lock_path}: held by {holder} for over {COMPACT_WAIT_S:.0f} s; remove it if that process is gone")
                time.sleep(0.02)
            try:
                yield
            finally:
                if _read_json(self.lock_path) == me:  # still ours (not broken by a newer owner)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.lock_path)

    def _create_lock(self, text: str) -> bool:
        """Put ``results.compacting`` in place holding ``text``; False when it exists."""
        tmp = self.run_dir / f"{atomicio.TMP_PREFIX}compacting-{uuid.uuid4().hex}"
        tmp.write_text(text)
        try:
            os.link(tmp, self.lock_path)
            return True
        except FileExistsError:
            return False
        except OSError as e:  # a filesystem without hard links: O_EXCL, then the text
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _break_lock(self, holder: dict) -> bool:
        """Move a stale lock away, and only the one judged stale: if another process broke it
        and took the lock meanwhile, that lock goes back."""
        aside = self.run_dir / f"{atomicio.TMP_PREFIX}broken-{uuid.uuid4().hex}"
        try:
            os.rename(self.lock_path, aside)
        except FileNotFoundError:
            return False
        try:
            if _read_json(aside) == holder:
                return True
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.lock_path)  # someone's live lock: put it back
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)

    def _stale(self, holder: dict) -> bool:
        """Whether a compaction lock's holder is gone: of an older epoch than the run's, or
        a process on this host that no longer exists, or this process (which holds its own
        process lock now: the file is left from an interrupted compaction)."""
        if "unreadable" in holder:  # its holder died writing it: stale once it is not new
            try:
                return time.time() - self.lock_path.stat().st_mtime > COMPACT_WAIT_S
            except FileNotFoundError:
                return False
        epoch = holder.get("epoch")
        if epoch is not None and epoch < run_epoch.current(self.run_dir):
            return True
        if holder.get("host") != socket.gethostname():
            return False
        if holder.get("pid") == os.getpid():
            return True
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
        return False

    def _part_paths(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        with os.scandir(self.parts_dir) as it:  # names sorted as strings: Path comparison costs 10x
            names = sorted(e.name for e in it if e.name.endswith(".parquet") and not e.name.startswith("."))
        return [self.parts_dir / n for n in names]

    def _ok_ids(self) -> dict[str, int]:
        """Arch id -> the most rungs of its ok rows, for archs with one; call under the lock
        (the table does not change meanwhile).

        Each file's ids are remembered by (name, mtime, size): parts never change once
        renamed in, and the table only by compaction, so the flow's append per finished
        evaluation reads only the files that are new since its last one.
        """
        ids: dict[str, int] = {}
        seen = {}
        for p in self._part_paths() + ([self.path] if self.path.exists() else []):
            try:
                st = p.stat()
            except FileNotFoundError:  # a part another ResultsTable compacted away: its rows are in the table
                continue
            key = (p.name, st.st_mtime_ns, st.st_size)
            if key not in self._ok_cache:
                try:
                    with open(p, "rb") as f:
                        names = pq.read_schema(f).names
                        t = pq.read_table(f, columns=[c for c in ("arch_id", "status", "rung_epochs") if c in names], page_checksum_verification=True)
                except FileNotFoundError:
                    continue
                except (pa.ArrowException, OSError) as e:
                    if _io_error(e):
                        raise
                    self._name(p, f"damaged ({_text(e)}); left out until the owner's compaction moves it to quarantine")
                    continue
                if "rung_epochs" not in t.column_names:  # schema 1
                    t = t.append_column("rung_epochs", pa.array([[]] * t.num_rows, type=_INT_LIST))
                t = t.filter(pc.equal(t.column("status"), "ok"))
                file_ids: dict[str, int] = {}
                for aid, n in zip(t.column("arch_id").to_pylist(), _rungs(t).to_pylist(), strict=True):
                    file_ids[aid] = max(n, file_ids.get(aid, 0))
                self._ok_cache[key] = file_ids
            seen[key] = self._ok_cache[key]
            for aid, n in seen[key].items():
                ids[aid] = max(n, ids.get(aid, 0))
        self._ok_cache = seen
        return ids

    def _read_or_quarantine(self, path: Path) -> pa.Table | None:
        """For the owner's compaction only: the file's rows, or None for a damaged file (bad
        magic bytes, page checksum, truncation), which is moved to ``run_dir/quarantine/``
        with a warning naming it; its archs count as not evaluated (the search evaluates them
        again when sampled again). An I/O error (``ESTALE``, ``EMFILE``, ...) is retried, then
        raised: a healthy file is never moved for the filesystem's hiccup."""
        try:
            return _with_retries(lambda: self._read_file(path))
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError) as e:
            if _io_error(e):
                raise
            self._move_aside(path, "quarantine", f"damaged ({_text(e)}); its rows count as not evaluated")
            return None

    def _read_for_reader(self, path: Path) -> pa.Table | None:
        """A reader's read: never moves a file. A damaged one is named and left out (the
        owner's next compaction quarantines it); an I/O error is retried, then raised; a
        file gone meanwhile (a compacted part) is None."""
        try:
            return _with_retries(lambda: self._read_file(path))
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError) as e:
            if _io_error(e):
                raise
            self._name(path, f"damaged ({_text(e)}); left out until the owner's compaction moves it to quarantine")
            return None

    def _read_main(self, *, owner: bool) -> tuple[pa.Table | None, int]:
        """``results.parquet``'s rows (None when absent or, for a reader, damaged) and the epoch
        that last compacted it (0: none recorded)."""
        read = self._read_or_quarantine if owner else self._read_for_reader
        try:
            t = read(self.path)
        except FileNotFoundError:
            return None, 0
        if t is None:
            return None, 0
        return t, int((t.schema.metadata or {}).get(SEALED_KEY, b"0"))

    def _left_out(self, part: Path, sealed: int) -> bool:
        """A reader's view of a fenced part: named once, left out."""
        if not _fenced(part, sealed):
            return False
        self._name(part, f"written by a task of epoch {_part_epoch(part)} after epoch {sealed} took the run; left out")
        return True

    def _name(self, path: Path, why: str) -> None:
        if path.name not in self._named:
            self._named.add(path.name)
            log.warning("%s: %s", path, why)

    def _move_aside(self, path: Path, folder: str, why: str) -> None:
        """The owner moves a file it will not merge to ``run_dir/<folder>/``, naming it."""
        dest = self.run_dir / folder / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{path.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.rename(dest)
            log.warning("%s: %s; moved to %s", path, why, dest)

    @staticmethod
    def _read_file(path: Path) -> pa.Table:
        """The file's rows in :data:`SCHEMA`, with its own schema metadata (the sealed epoch)."""
        # One open file: a concurrent rename cannot mix two versions. ParquetFile, not
        # read_table: the dataset machinery costs a tiny part file twice the time (2.7 vs 1.5 ms).
        with open(path, "rb") as f:
            t = pq.ParquetFile(f, page_checksum_verification=True).read()
        meta = t.schema.metadata or {}
        if not t.schema.equals(SCHEMA, check_metadata=False):
            for name, default in OPTIONAL_DEFAULTS.items():  # a file of schema 1
                if name not in t.schema.names:
                    t = t.append_column(SCHEMA.field(name), pa.array([default] * t.num_rows, type=SCHEMA.field(name).type))
            for field in SCHEMA:
                if field.name not in t.schema.names:
                    raise ValueError(f"{path}: missing field {field.name!r} (schema version {SCHEMA_VERSION})")
            extra = [n for n in t.schema.names if n not in SCHEMA.names]
            if extra:
                raise ValueError(f"{path}: unknown field {extra[0]!r} (schema version {SCHEMA_VERSION})")
            cols = []
            for field in SCHEMA:  # e.g. large_string written by pandas -> string
                col = t.column(field.name)
                try:
                    cols.append(col.cast(field.type) if col.type != field.type else col)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise ValueError(f"{path}: field {field.name!r} is {col.type}, expected {field.type}") from None
            t = pa.Table.from_arrays(cols, schema=SCHEMA)
        return t.replace_schema_metadata({**SCHEMA.metadata, **({SEALED_KEY: meta[SEALED_KEY]} if SEALED_KEY in meta else {})})


def _rows_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """``rows_to_table`` for the writers, which take a list of rows, never a single row."""
    if isinstance(rows, Mapping):
        raise ValueError("rows: expected a list of row dicts, got a single dict")
    return rows_to_table(rows)


def _part_epoch(part: Path) -> int | None:
    """The epoch in a part's name (None: written without one, by a reader-side tool or before epochs)."""
    m = _PART_EPOCH.match(part.name)
    return None if m is None else int(m.group(1))


_ARCH_ID = re.compile(r"[0-9A-Za-z_]{1,64}")


def _part_arch(name: str) -> str | None:
    """The arch whose rows are the only ones in a part named ``...=<arch_id>.parquet``
    (``_write_part`` names it so); None for a part of several archs, or an older name."""
    stem, eq, arch = name.removesuffix(".parquet").rpartition("=")
    return arch if eq and stem and _ARCH_ID.fullmatch(arch) else None


def _fenced(part: Path, sealed: int) -> bool:
    """A part of an epoch older than the one that last compacted the table: its owner was
    superseded and that compaction took every part then present, so this one came after."""
    epoch = _part_epoch(part)
    return epoch is not None and epoch < sealed


def _io_error(e: BaseException) -> bool:
    """An error of the filesystem (``ESTALE``, ``EMFILE``, ``EIO``: it has an errno), not of
    the file's bytes (pyarrow's checksum and format errors have none)."""
    return isinstance(e, OSError) and e.errno is not None


def _with_retries(read, tries: int = READ_TRIES):
    """``read()``, again after an I/O error (NFS ``ESTALE`` while another host renames the
    file, ``EMFILE`` for a moment) up to ``tries`` times in all."""
    for i in range(tries):
        try:
            return read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if not _io_error(e) or i == tries - 1:
                raise
            time.sleep(0.05 * 2**i)


def _read_json(path: Path) -> dict | None:
    """A lock file's holder; None when the file is gone; ``{"unreadable": ...}`` when it holds
    no JSON object (left by a holder that died while writing it, on a filesystem without links)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        data = None
    return data if isinstance(data, dict) else {"unreadable": str(path)}


def _text(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _delete_parts(parts: list[Path]) -> None:
    for p in parts:
        _unlink(p)


def _rungs(table: pa.Table) -> pa.Array:
    """Rungs each row reached, at least 1 (rows of schema 1 and single-fidelity rows are alike)."""
    return pc.max_element_wise(pc.list_value_length(table.column("rung_epochs")).fill_null(0), pa.scalar(1, pa.int32()))


def _dedup(table: pa.Table) -> pa.Table:
    """One row per arch_id by the dedup rule (of its rows that reached the most rungs: the first
    ok, else the last), sorted by step, sample, arch_id."""
    if table.num_rows == 0:
        return table
    keyed = table.append_column("_rungs", _rungs(table))
    order = pc.sort_indices(keyed, sort_keys=[("arch_id", "ascending"), ("_rungs", "descending")] + [(k, "ascending") for k in _ORDER_KEYS]).to_pylist()
    ids = table.column("arch_id").to_pylist()
    ok = [s == "ok" for s in table.column("status").to_pylist()]
    rungs = keyed.column("_rungs").to_pylist()
    keep: dict[str, int] = {}
    for i in order:  # rows of one arch are consecutive: most rungs first, then in content order
        j = keep.get(ids[i])
        if j is None or (not ok[j] and rungs[i] == rungs[j]):  # an ok row is final; a failed one yields to a later row of its rung
            keep[ids[i]] = i
    kept = table.take(pa.array(sorted(keep.values()), type=pa.int64()))
    return kept.take(pc.sort_indices(kept, sort_keys=[("step", "ascending"), ("sample", "ascending"), ("arch_id", "ascending")]))
