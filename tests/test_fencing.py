"""The run epoch (fencing token) and the results table on a shared filesystem that does not
give ``flock`` and may answer ``ESTALE``: issue #26's storage faults, without Dask."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import record

import storage.results as R
from nasfcos.search import loop
from nasfcos.search.policies import RandomPolicy
from storage import run_epoch
from storage.results import ResultsTable
from storage.run_lock import held_epoch, run_lock


def _archs(n, seed=0):
    return [s.arch for s in RandomPolicy(seed=seed).sample(n)]


def make_row(arch, sample=0):
    return loop.make_row(record(arch, 0.5), step=0, sample=sample, penalty=-10.0)


def test_each_owner_takes_the_next_epoch_and_the_older_one_is_fenced(tmp_path):
    assert run_epoch.current(tmp_path) == 0
    with run_lock(tmp_path, "first"):
        first = held_epoch(tmp_path)
        with run_lock(tmp_path):  # a subflow re-enters: the same epoch
            assert held_epoch(tmp_path) == first == 1
    assert held_epoch(tmp_path) is None
    with run_lock(tmp_path, "second"):
        assert held_epoch(tmp_path) == run_epoch.current(tmp_path) == 2
        run_epoch.check(tmp_path, 2)
        with pytest.raises(run_epoch.Fenced, match=r"belongs to epoch 1, but epoch 2 \(second on host .* pid \d+"):
            run_epoch.check(tmp_path, 1, "this task")
    # two takers racing for one number: each gets its own
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        got = pool.starmap(run_epoch.take, [(str(tmp_path), f"racer {i}") for i in range(8)])
    assert sorted(got) == list(range(3, 11))


def test_a_superseded_owners_late_result_is_left_out_and_moved_aside(tmp_path, caplog, monkeypatch):
    a, b, c = _archs(3, seed=4)
    run_epoch.take(tmp_path)
    old = ResultsTable(tmp_path, epoch=1)
    old.write_part([make_row(a, sample=0)])  # written while epoch 1 owned the run: kept
    run_epoch.take(tmp_path)
    new = ResultsTable(tmp_path, epoch=2)
    assert new.compact() == 1  # the takeover compaction seals epoch 2
    with pytest.raises(run_epoch.Fenced):
        old.write_part([make_row(b, sample=1)])  # the zombie checks and stops
    monkeypatch.setattr(run_epoch, "check", lambda *a, **k: None)  # ... or its write lands in the window after its check
    old.write_part([make_row(b, sample=1)])
    monkeypatch.undo()
    new.write_part([make_row(c, sample=2)])
    with caplog.at_level(logging.WARNING, logger="storage.results"):
        assert sorted(ResultsTable(tmp_path).read().arch_id) == sorted([a.arch_id, c.arch_id])
    assert any("epoch 1 after epoch 2 took the run; left out" in r.getMessage() for r in caplog.records)
    assert len(list(new.parts_dir.iterdir())) == 2  # the reader moved nothing
    assert new.compact() == 2 and len(list((tmp_path / "results.fenced").iterdir())) == 1 and not list(new.parts_dir.iterdir())
    # a script compacting a run that has owners becomes one (the run lock, epoch 3), and the
    # owner before it is fenced from then on
    assert ResultsTable(tmp_path).compact() == 2 and run_epoch.current(tmp_path) == 3
    with pytest.raises(run_epoch.Fenced):
        new.compact()


def _stale_reads(monkeypatch, path: Path, times: int, err: int = errno.ESTALE):
    real = ResultsTable._read_file
    seen = []

    def read(p):
        if Path(p) == path and len(seen) < times:
            seen.append(p)
            raise OSError(err, os.strerror(err), str(p))
        return real(p)

    monkeypatch.setattr(ResultsTable, "_read_file", staticmethod(read))
    return seen


@pytest.mark.parametrize("err", [errno.ESTALE, errno.EMFILE])
def test_an_io_error_while_reading_never_moves_the_healthy_table(tmp_path, monkeypatch, err):
    """Fault 7: an OSError of the filesystem (NFS ESTALE while another host replaces the
    table, EMFILE) used to move the healthy results.parquet to quarantine; the next
    compaction then wrote only the parts (1 of 5 rows survived)."""
    t = ResultsTable(tmp_path)
    rows = [make_row(a, sample=i) for i, a in enumerate(_archs(5, seed=2))]
    t.write_part(rows[:4])
    t.compact()
    t.write_part(rows[4:])
    before = t.path.read_bytes()
    seen = _stale_reads(monkeypatch, t.path, times=2, err=err)  # a moment's hiccup: retried
    assert len(t.read()) == 5 and len(seen) == 2
    seen = _stale_reads(monkeypatch, t.path, times=99, err=err)  # it persists: raised, nothing moved
    with pytest.raises(OSError) as info:
        ResultsTable(tmp_path).read()  # a new reader (t serves its unchanged copy from memory)
    assert info.value.errno == err and str(t.path) in str(info.value)
    with pytest.raises(OSError):
        t.compact()
    monkeypatch.undo()
    assert t.path.read_bytes() == before and not (tmp_path / "quarantine").exists() and len(t._part_paths()) == 1
    assert t.compact() == 5 and len(pd.read_parquet(t.path)) == 5


def _paused_compactor(run_dir: str, epoch, gate: str) -> None:
    """A compaction in another process, on a filesystem without flock, paused just before it
    renames its merge over results.parquet until ``gate`` exists."""
    import fcntl
    import sys

    import atomicio
    import storage.results as results

    def no_flock(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    fcntl.flock = no_flock
    real = atomicio.write_bytes

    def paused(path, data):
        if Path(path).name == "results.parquet":
            Path(gate + ".reached").touch()
            while not Path(gate).exists():
                time.sleep(0.02)
        real(path, data)

    atomicio.write_bytes = paused
    try:
        (results.ResultsTable(run_dir) if epoch is None else results.ResultsTable(run_dir, epoch=epoch)).compact()
    except Exception as e:  # noqa: BLE001
        print(f"{type(e).__name__}: {e}", flush=True)
        sys.exit(2)


@pytest.mark.parametrize("epochs", [False, True])
def test_two_compactors_without_flock_lose_no_row(tmp_path, monkeypatch, epochs):
    """Fault 7: compactor A lists the parts, compactor B (another process; no flock to stop
    it) merges and deletes a part A never saw, then A renames its older merge over B's: the
    row was lost. Now the compaction lock is an O_EXCL file: B waits for A (same epoch or
    none), or, when B is a newer owner, breaks A's lock and keeps the parts it merged until
    its next compaction finds its own table in place (A stalled between its last epoch
    check and its rename, the window a filesystem without compare-and-swap leaves)."""
    import fcntl

    monkeypatch.setattr(fcntl, "flock", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOLCK, "No locks available")))
    rows = [make_row(a, sample=i) for i, a in enumerate(_archs(2, seed=6))]
    if epochs:
        run_epoch.take(tmp_path)
    ResultsTable(tmp_path, epoch=1 if epochs else None).write_part(rows[:1])
    gate = str(tmp_path / "gate")
    a = mp.get_context("spawn").Process(target=_paused_compactor, args=(str(tmp_path), 1 if epochs else None, gate))
    a.start()
    deadline = time.monotonic() + 60
    while not Path(gate + ".reached").exists():
        assert time.monotonic() < deadline and a.exitcode is None
        time.sleep(0.02)
    ResultsTable(tmp_path, epoch=1 if epochs else None).write_part(rows[1:])
    if epochs:  # a newer owner takes the run while the old one's compaction is paused
        b = ResultsTable(tmp_path, epoch=run_epoch.take(tmp_path))
        assert b.compact() == 2  # breaks the superseded holder's lock
    else:
        monkeypatch.setattr(R, "COMPACT_WAIT_S", 0.5)
        b = ResultsTable(tmp_path)
        with pytest.raises(RuntimeError, match=rf"results.compacting: held by .*'pid': {a.pid}"):
            b.compact()
    Path(gate).touch()
    a.join(timeout=60)
    assert a.exitcode == 0  # A renamed its merge (lacking rows[1]) over B's: stalled past its last check
    b.compact()  # B kept the parts it merged after breaking A's lock, finds its table replaced, merges again
    assert sorted(pd.read_parquet(b.path).arch_id) == sorted(r["arch_id"] for r in rows)
    assert sorted(ResultsTable(tmp_path).read().arch_id) == sorted(r["arch_id"] for r in rows)
    assert not b.lock_path.exists()
    if epochs:
        assert json.loads((tmp_path / "epochs" / "00000002.json").read_text())["epoch"] == 2
