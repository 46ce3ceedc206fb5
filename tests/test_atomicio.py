"""atomicio: the one atomic write (temp file beside the target, fsync, rename), its
permissions under the umask, and the removal of temp files left by killed writers."""

from __future__ import annotations

import os
import stat
import time

import pytest

import atomicio


@pytest.fixture
def umask_022():
    saved = os.umask(0o022)
    yield
    os.umask(saved)


def test_a_file_gets_the_permissions_of_open_under_the_umask(tmp_path, umask_022):
    atomicio.write_bytes(tmp_path / "a.bin", b"x")
    with open(tmp_path / "plain.bin", "wb") as f:  # what an ordinary write gives
        f.write(b"x")
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode) == 0o644
    os.umask(0o077)  # a private umask stays private
    atomicio.write_text(tmp_path / "b.txt", "y")
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600


def test_writes_replace_whole_files_and_leave_no_temp(tmp_path):
    path = tmp_path / "sub" / "m.json"  # the folder is made
    atomicio.write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'  # sorted keys: diffable manifests
    atomicio.write_with(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["m.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "c.pt"
    atomicio.write_bytes(path, b"old")

    def half(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomicio.write_with(path, half)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["c.pt"]


def test_a_writer_that_takes_a_file_name_gets_the_same_atomic_write(tmp_path, umask_022):
    """write_via_path: for safetensors' save_file and torch.onnx.export, which want a path."""
    path = tmp_path / "model.onnx"
    seen = []

    def write(tmp):
        seen.append(tmp)
        tmp.write_bytes(b"graph")

    atomicio.write_via_path(path, write)
    assert path.read_bytes() == b"graph" and os.listdir(tmp_path) == ["model.onnx"]
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".tmp-model.onnx.") and seen[0].suffix == ".onnx"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

    def refused(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("DeformConv refused")

    with pytest.raises(RuntimeError, match="refused"):
        atomicio.write_via_path(path, refused)
    assert path.read_bytes() == b"graph" and os.listdir(tmp_path) == ["model.onnx"]


def test_orphans_are_removed_by_age_or_all_of_one_file(tmp_path):
    old = time.time() - atomicio.ORPHAN_AGE_S - 60
    for name in (".tmp-a.pt.1", ".tmp-a.pt.2", ".tmp-b.pt.1", ".tmp-a.pt2.1", "a.pt", "a.ptx1y2.tmp"):
        (tmp_path / name).write_bytes(b"")
    os.utime(tmp_path / ".tmp-a.pt.1", (old, old))
    assert atomicio.remove_orphans(tmp_path) == 1  # only the old one: a young one may be in progress
    # its one writer restarts: its temp files go, those named before atomicio (a.ptXXXX.tmp) too
    assert atomicio.remove_orphans(tmp_path, name="a.pt", older_than=0) == 2
    assert sorted(os.listdir(tmp_path)) == [".tmp-a.pt2.1", ".tmp-b.pt.1", "a.pt"]
    assert atomicio.remove_orphans(tmp_path / "missing") == 0
