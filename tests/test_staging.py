"""Tests for storage.staging: one node-local copy of a shared feature store per machine.

Stores are tiny (one level of 4x4x4 fp16 per sample), so the file runs in a few seconds;
most of that is starting two spawned processes for the concurrency test.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from storage import staging
from storage.features import FeatureStore, materialise
from storage.staging import MARKER, stage_store

LEVELS = {"C3": (4, 4, 4)}
SPLITS = {"meta_train": 10, "meta_val": 3}
SHARD = 4


def _compute(split: str):
    def compute(start: int, stop: int) -> dict[str, Any]:
        ids = np.arange(start, stop)
        rng = np.random.default_rng([start, len(split)])
        return {
            "features": {"C3": rng.standard_normal((stop - start, *LEVELS["C3"])).astype(np.float16)},
            "image_id": ids.astype(np.int64),
            "crop": np.stack([ids, ids, ids + 384, ids + 384], axis=1).astype(np.int32),
            "scale": np.ones((stop - start, 2), np.float32),
            "boxes": [np.full((i % 3, 4), i, np.float32) for i in ids],
            "labels": [np.full(i % 3, i % 20, np.int64) for i in ids],
        }

    return compute


def _make_store(path: Path, shards: list[int] | None = None) -> FeatureStore:
    """A feature store with all of meta_val and ``shards`` (default all) of meta_train done."""
    store = FeatureStore.create(path, splits=SPLITS, levels=LEVELS, shard_size=SHARD, attrs={"seed": 0})
    materialise(store, "meta_val", _compute("meta_val"))
    materialise(store, "meta_train", _compute("meta_train"), shards=shards)
    return store


def _assert_same_split(a: dict[str, Any], b: dict[str, Any]) -> None:
    np.testing.assert_array_equal(a["features"]["C3"].view(np.uint16), b["features"]["C3"].view(np.uint16))
    for key in ("image_id", "crop", "scale"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in ("boxes", "labels"):
        assert len(a[key]) == len(b[key])
        for x, y in zip(a[key], b[key], strict=True):
            np.testing.assert_array_equal(x, y, err_msg=key)


def _visible(root: Path) -> list[str]:
    """Finished copies under ``root`` (not lock files, not temp dirs)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "shared" / "features"
    _make_store(path)
    return path


def _fail_copytree(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("copytree called: the store was copied again")


# ---------------------------------------------------------------------------- once per node


def test_stage_copies_once_and_copy_reads_equal(src: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    root = tmp_path / "local"  # created by stage_store
    with caplog.at_level(logging.INFO, logger="storage.staging"):
        dest = stage_store(src, root)
    assert dest.parent == root and dest.name.startswith("features-") and len(dest.name) == len("features-") + 16
    assert _visible(root) == [dest.name]
    marker = json.loads((dest / MARKER).read_text())
    files = [p for p in src.rglob("*") if p.is_file()]
    assert marker["source"] == str(src) and marker["files"] == len(files)
    assert marker["bytes"] == sum(p.stat().st_size for p in files)
    assert dest.name.endswith(marker["digest"][:16])
    [record] = [r for r in caplog.records if r.name == "storage.staging"]
    assert "\n" not in record.getMessage() and str(dest) in record.getMessage()

    staged, source = FeatureStore.open(dest), FeatureStore.open(src)
    assert staged.splits == source.splits and staged.attrs == source.attrs
    for split in SPLITS:
        _assert_same_split(staged.read_split(split), source.read_split(split))

    marker_mtime = (dest / MARKER).stat().st_mtime_ns
    monkeypatch.setattr(staging, "_copytree", _fail_copytree)
    assert stage_store(str(src), str(root)) == dest  # str arguments, same answer, no copy
    assert (dest / MARKER).stat().st_mtime_ns == marker_mtime
    assert _visible(root) == [dest.name]


def test_changed_source_gets_a_new_copy_and_old_copy_is_kept(tmp_path: Path) -> None:
    src, root = tmp_path / "shared" / "features", tmp_path / "local"
    _make_store(src, shards=[0, 1])  # meta_train shard 2 not yet written
    first = stage_store(src, root)
    with pytest.raises(ValueError, match="incomplete"):
        FeatureStore.open(first).read_split("meta_train")

    materialise(FeatureStore.open(src), "meta_train", _compute("meta_train"))  # re-materialised: new files
    second = stage_store(src, root)
    assert second != first and second.name.startswith("features-")
    _assert_same_split(FeatureStore.open(second).read_split("meta_train"), FeatureStore.open(src).read_split("meta_train"))
    assert sorted(_visible(root)) == sorted([first.name, second.name])  # the old copy is left alone

    # Same size, only the mtime changes (a repaired file): also a new copy.
    chunk = next(p for p in sorted(src.rglob("*")) if p.is_file() and p.name != "zarr.json")
    st = chunk.stat()
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    third = stage_store(src, root)
    assert third not in (first, second)
    assert len(_visible(root)) == 3


# ---------------------------------------------------------------------------- concurrency

COPY_DELAY_S = 0.3  # a slow copy, so that every other stager arrives while it runs
THREADS = 3


def _counting_copytree(log: str):
    real = staging._copytree

    def copytree(*args: Any, **kwargs: Any) -> Any:
        with open(log, "a") as f:  # O_APPEND: lines of several processes do not mix
            f.write(f"{os.getpid()}\n")
        time.sleep(COPY_DELAY_S)
        return real(*args, **kwargs)

    return copytree


def _stage_in_threads(src: str, root: str, go: Any) -> list[str]:
    barrier = threading.Barrier(THREADS)
    results: list[str] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            barrier.wait(timeout=30)
            results.append(str(stage_store(src, root)))
        except BaseException as e:  # noqa: BLE001 - surfaced to the caller below
            errors.append(e)

    go.wait(timeout=60)
    threads = [threading.Thread(target=one) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _stage_worker(src: str, root: str, log: str, ready: Any, go: Any, out: Any) -> None:
    """Module level so that spawned processes can unpickle it."""
    staging._copytree = _counting_copytree(log)  # this child's copies are counted
    ready.put(os.getpid())
    try:
        out.put(("ok", _stage_in_threads(src, root, go)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent process
        out.put(("error", repr(e)))


def test_concurrent_processes_and_threads_make_one_copy(src: Path, tmp_path: Path, monkeypatch) -> None:
    root, log = tmp_path / "local", tmp_path / "copies.log"
    monkeypatch.setattr(staging, "_copytree", _counting_copytree(str(log)))
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_stage_worker, args=(str(src), str(root), str(log), ready, go, out)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        pids = {ready.get(timeout=60) for _ in procs}
        go.set()  # both children and this process's threads start together
        results = _stage_in_threads(str(src), str(root), go)
        for _ in procs:
            status, value = out.get(timeout=60)
            assert status == "ok", value
            results += value
    finally:
        for p in procs:
            p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]

    assert len(results) == THREADS * 3 and len(set(results)) == 1
    copies = log.read_text().split()
    assert len(copies) == 1, f"copied {len(copies)} times by pids {copies}"
    dest = Path(results[0])
    marker = json.loads((dest / MARKER).read_text())
    assert str(marker["pid"]) == copies[0] and marker["pid"] in pids | {os.getpid()}
    assert _visible(root) == [dest.name]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    _assert_same_split(FeatureStore.open(dest).read_split("meta_train"), FeatureStore.open(src).read_split("meta_train"))


# ---------------------------------------------------------------------------- leftovers and errors


def test_stale_temp_dir_is_removed_and_others_are_kept(src: Path, tmp_path: Path) -> None:
    root = tmp_path / "local"
    dest = stage_store(src, root)
    shutil.rmtree(dest)  # as if the machine had only got as far as a killed copy
    stale = root / f".tmp-{dest.name}-999999-deadbeef"
    (stale / "C3").mkdir(parents=True)
    (stale / "C3" / "half-written").write_bytes(b"x" * 10)
    other = root / ".tmp-other-0123456789abcdef-1-cafe"  # another store's copy in progress
    other.mkdir()

    assert stage_store(src, root) == dest
    assert not stale.exists() and other.exists()
    assert json.loads((dest / MARKER).read_text())["digest"].startswith(dest.name.rsplit("-", 1)[1])


def test_destination_without_marker_is_replaced(src: Path, tmp_path: Path) -> None:
    root = tmp_path / "local"
    dest = stage_store(src, root)
    (dest / MARKER).unlink()
    (dest / "junk").write_text("not from the source")
    assert stage_store(src, root) == dest
    assert not (dest / "junk").exists() and (dest / MARKER).exists()


def test_bad_source_or_root_errors_name_the_path(src: Path, tmp_path: Path) -> None:
    missing = tmp_path / "shared" / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        stage_store(missing, tmp_path / "local")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(ValueError, match=str(a_file)):
        stage_store(a_file, tmp_path / "local")
    bad_root = a_file / "local"  # its parent is a file: cannot be created
    with pytest.raises(OSError, match=str(bad_root)) as info:
        stage_store(src, bad_root)
    assert "\n" not in str(info.value)


def test_incomplete_copy_is_refused_and_cleaned_up(src: Path, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "local"
    real = staging._copytree

    def lossy(source: Path, target: Path) -> None:
        real(source, target)
        next(p for p in Path(target).rglob("*") if p.is_file()).unlink()  # e.g. disk full mid-copy

    monkeypatch.setattr(staging, "_copytree", lossy)
    with pytest.raises(OSError, match="files") as info:
        stage_store(src, root)
    message = str(info.value)
    assert str(src) in message and str(root) in message and "\n" not in message
    assert list(root.iterdir()) == [next(root.glob("*.lock"))]  # no copy, no temp dir

    def touching(source: Path, target: Path) -> None:
        real(source, target)
        (Path(source) / "zarr.json").touch()  # a writer changed the source meanwhile

    monkeypatch.setattr(staging, "_copytree", touching)
    with pytest.raises(OSError, match="changed while it was copied"):
        stage_store(src, root)
    assert _visible(root) == []
