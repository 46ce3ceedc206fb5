"""Tests for storage.features: the proxy task's cached backbone features (NAS-FCOS §3.3).

Shape legend: N samples of a split, B samples of a shard, C/H/W of one level, M boxes.
Stores are tiny (two levels of a few hundred values per sample) so the file runs in seconds;
every comparison of float16 data is on the bit patterns (``.view(np.uint16)``), so -0.0,
NaN payloads and subnormals must survive exactly.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from storage.features import CHECKSUM, CODECS, DEFAULT_CODEC, DamagedShard, FeatureStore, materialise

LEVELS = {"C2": (4, 8, 8), "C3": (8, 4, 4)}
SPLITS = {"meta_train": 22, "meta_val": 7}  # 22 = 5 shards of 5 with a short last one (2)
SHARD = 5
ATTRS = {"backbone_sha256": "ab12", "split_seed": 0, "crop": 384}
ZERO_SAMPLES = (3, 10, 11, 12, 13, 14)  # 10..14 is all of shard 2
NEG_ZERO_SAMPLE = 4
NO_BOX_SAMPLES = (0, 5, 10, 11, 12, 13, 14)  # shard 2 has no boxes at all


def _sample_data(split: str, start: int, stop: int) -> dict[str, Any]:
    """Deterministic write_shard() arguments for samples [start, stop) of ``split``.

    Features hold special float16 values and some all-zero (and all -0.0) samples, which
    Zarr would be tempted to skip; boxes vary from 0 to 3 per sample.
    """
    features: dict[str, np.ndarray] = {}
    offset = 1000 * list(SPLITS).index(split) if split in SPLITS else 0
    for level, (c, h, w) in LEVELS.items():
        values = []
        for i in range(start, stop):
            rng = np.random.default_rng([offset + i, c])
            x = (rng.standard_normal((c, h, w)) * 50).astype(np.float16)  # (C, H, W)
            x.flat[:6] = np.array([np.inf, -np.inf, np.nan, -0.0, 6e-8, 65504], dtype=np.float16)
            if i in ZERO_SAMPLES:
                x[:] = 0
            if i == NEG_ZERO_SAMPLE:
                x[:] = -0.0
            values.append(x)
        features[level] = np.stack(values)  # (B, C, H, W)
    boxes, labels = [], []
    for i in range(start, stop):
        m = 0 if i in NO_BOX_SAMPLES else 1 + (offset + i) % 3
        rng = np.random.default_rng(offset + i)
        xy = rng.uniform(0, 300, size=(m, 2)).astype(np.float32)
        boxes.append(np.concatenate([xy, xy + rng.uniform(1, 80, size=(m, 2)).astype(np.float32)], axis=1))  # (M, 4)
        labels.append(rng.integers(0, 20, size=m))  # int64 (M,)
    ids = np.arange(start, stop) + offset
    return {
        "features": features,
        "image_id": ids.astype(np.int64),
        "crop": np.stack([ids % 7, ids % 5, ids % 7 + 384, ids % 5 + 384], axis=1),  # int64, as torch gives it
        "scale": np.stack([1 + ids / 100, 1 + ids / 50], axis=1).astype(np.float32),
        "boxes": boxes,
        "labels": labels,
    }


def _compute_meta_train(start: int, stop: int) -> dict[str, Any]:
    """Module level so that spawned processes can unpickle it."""
    return _sample_data("meta_train", start, stop)


def _expected(split: str) -> dict[str, Any]:
    return _sample_data(split, 0, SPLITS[split])


def _create(path: Path, **overrides: Any) -> FeatureStore:
    kwargs: dict[str, Any] = dict(splits=SPLITS, levels=LEVELS, shard_size=SHARD, attrs=ATTRS)
    kwargs.update(overrides)
    return FeatureStore.create(path, **kwargs)


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Bit-exact equality of read_split-style dicts (float16 compared as uint16 patterns)."""
    assert set(got["features"]) == set(want["features"])
    for level, values in want["features"].items():
        assert got["features"][level].dtype == np.float16
        np.testing.assert_array_equal(got["features"][level].view(np.uint16), values.view(np.uint16), err_msg=level)
    for key, dtype in (("image_id", np.int64), ("crop", np.int32), ("scale", np.float32)):
        assert got[key].dtype == dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for key, dtype, tail in (("boxes", np.float32, (4,)), ("labels", np.int64, ())):
        assert len(got[key]) == len(want[key]), key
        for i, (g, w) in enumerate(zip(got[key], want[key], strict=True)):
            assert g.dtype == dtype and g.shape == (len(w), *tail), (key, i, g.dtype, g.shape)
            np.testing.assert_array_equal(g, w, err_msg=f"{key}[{i}]")


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", list(CODECS))
def test_round_trip_is_bit_exact_for_every_codec(tmp_path: Path, codec: str) -> None:
    store = _create(tmp_path / "f.zarr", codec=codec)
    assert materialise(store, "meta_train", _compute_meta_train) == [0, 1, 2, 3, 4]
    got = FeatureStore.open(tmp_path / "f.zarr").read_split("meta_train")
    _assert_same(got, _expected("meta_train"))
    # The special samples really are what the test claims.
    assert not np.any(got["features"]["C2"][10:15].view(np.uint16))
    assert np.all(got["features"]["C3"][NEG_ZERO_SAMPLE].view(np.uint16) == 0x8000)


def test_ragged_boxes_and_labels_with_empty_samples_and_an_empty_shard(tmp_path: Path) -> None:
    store = _create(tmp_path / "f.zarr")
    materialise(store, "meta_train", _compute_meta_train)
    got = store.read_split("meta_train", levels=[])
    assert got["features"] == {}
    counts = [len(b) for b in got["boxes"]]
    assert [i for i, m in enumerate(counts) if m == 0] == list(NO_BOX_SAMPLES)
    assert max(counts) == 3
    assert got["boxes"][0].shape == (0, 4) and got["labels"][0].shape == (0,)
    _assert_same({**got, "features": {}}, {**_expected("meta_train"), "features": {}})


def test_iter_batches_equals_read_split(tmp_path: Path) -> None:
    store = _create(tmp_path / "f.zarr", chunk_size=1)
    materialise(store, "meta_train", _compute_meta_train)
    full = store.read_split("meta_train")
    n = SPLITS["meta_train"]

    def gather(batches: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "features": {level: np.concatenate([b["features"][level] for b in batches]) for level in batches[0]["features"]},
            **{key: np.concatenate([b[key] for b in batches]) for key in ("image_id", "crop", "scale")},
            **{key: [x for b in batches for x in b[key]] for key in ("boxes", "labels")},
        }

    def select(index: np.ndarray, levels: list[str]) -> dict[str, Any]:
        return {
            "features": {level: full["features"][level][index] for level in levels},
            **{key: full[key][index] for key in ("image_id", "crop", "scale")},
            **{key: [full[key][i] for i in index] for key in ("boxes", "labels")},
        }

    sequential = list(store.iter_batches("meta_train", 4))
    assert [len(b["index"]) for b in sequential] == [4, 4, 4, 4, 4, 2]
    _assert_same(gather(sequential), full)

    order = np.random.default_rng(0).permutation(n)
    for prefetch in (True, False):
        shuffled = list(store.iter_batches("meta_train", 3, levels=["C3"], order=order, prefetch=prefetch))
        np.testing.assert_array_equal(np.concatenate([b["index"] for b in shuffled]), order)
        _assert_same(gather(shuffled), select(order, ["C3"]))

    subset = np.array([21, 2, 2, 7])  # repeats and a sample of the short last shard
    _assert_same(gather(list(store.iter_batches("meta_train", 10, order=subset))), select(subset, list(LEVELS)))
    with pytest.raises(ValueError, match=r"order.*\[0, 22\)"):
        store.iter_batches("meta_train", 2, order=np.array([0, 22]))


def test_nbytes_is_what_read_split_returns(tmp_path: Path) -> None:
    store = _create(tmp_path / "f.zarr")
    materialise(store, "meta_train", _compute_meta_train)
    got = store.read_split("meta_train")
    total = sum(v.nbytes for v in got["features"].values())
    total += sum(got[k].nbytes for k in ("image_id", "crop", "scale"))
    total += sum(x.nbytes for k in ("boxes", "labels") for x in got[k])
    assert store.nbytes("meta_train") == total
    only_c3 = store.nbytes("meta_train", levels=["C3"])
    assert store.nbytes("meta_train") - only_c3 == got["features"]["C2"].nbytes


# ---------------------------------------------------------------------------- create / open


def test_create_is_idempotent_and_keeps_written_shards(tmp_path: Path) -> None:
    path = tmp_path / "f.zarr"
    store = _create(path)
    assert store.num_shards("meta_train") == 5 and store.num_shards("meta_val") == 2
    assert store.shard_range("meta_train", 4) == (20, 22)
    assert store.codec == DEFAULT_CODEC
    assert set(store.versions) >= {"zarr", "numcodecs", "numpy"} and store.created_at
    materialise(store, "meta_train", _compute_meta_train, shards=[1])
    # Tuples come back as lists from JSON: still the same attrs.
    again = _create(path, attrs={**ATTRS, "crop": 384}, levels={k: list(v) for k, v in LEVELS.items()})
    assert again.done("meta_train").tolist() == [False, True, False, False, False]
    assert again.attrs == ATTRS and again.created_at == store.created_at
    assert not list(tmp_path.glob(".f.zarr.tmp-*"))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"splits": {**SPLITS, "meta_val": 8}}, "splits"),
        ({"splits": {"meta_train": 22}}, "splits"),
        ({"levels": {**LEVELS, "C3": (8, 4, 5)}}, "levels"),
        ({"shard_size": 11}, "shard_size"),
        ({"chunk_size": 1}, "chunk_size"),
        ({"codec": "zstd"}, "codec"),
        ({"attrs": {**ATTRS, "backbone_sha256": "cd34"}}, "attrs['backbone_sha256']"),
        ({"attrs": {**ATTRS, "extra": 1}}, "attrs['extra']"),
    ],
)
def test_create_with_a_different_layout_or_attrs_names_the_field(tmp_path: Path, override: dict, field: str) -> None:
    _create(tmp_path / "f.zarr")
    with pytest.raises(ValueError, match="existing store has " + re.escape(field)):
        _create(tmp_path / "f.zarr", **override)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"codec": "lzma"}, "none, blosc-lz4, blosc-zstd, zstd"),
        ({"chunk_size": 3}, "chunk_size=3: must be a positive divisor of shard_size=5"),
        ({"levels": {"boxes": (1, 1, 1)}}, "level name 'boxes'"),
        ({"splits": {"a/b": 3}}, "split name 'a/b'"),
        ({"splits": {"meta_train": 0}}, r"splits\['meta_train'\]=0"),
        ({"levels": {"C2": (4, 8)}}, r"levels\['C2'\]"),
        ({"attrs": {"when": object()}}, "attrs must be JSON-serialisable"),
    ],
)
def test_create_rejects_bad_arguments(tmp_path: Path, override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _create(tmp_path / "f.zarr", **override)
    assert not (tmp_path / "f.zarr").exists()


def test_auto_chunk_size_divides_the_shard_size(tmp_path: Path) -> None:
    small = _create(tmp_path / "small.zarr", shard_size=12)  # 512 B per sample: whole shard per chunk
    assert small.chunk_size == 12
    big = FeatureStore.create(tmp_path / "big.zarr", splits={"s": 4}, levels={"C2": (256, 96, 96)}, shard_size=12, attrs={})
    assert big.chunk_size == 1  # 4.7 MB per sample: one sample per chunk


def test_open_missing_or_corrupt_store_is_a_one_line_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.zarr"
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        FeatureStore.open(missing)

    junk = tmp_path / "junk.zarr"
    junk.mkdir()
    (junk / "zarr.json").write_text("{not json")
    with pytest.raises(ValueError) as info:
        FeatureStore.open(junk)
    assert str(junk) in str(info.value) and "\n" not in str(info.value)

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="other: exists and is not a feature store"):
        _create(other)
    with pytest.raises(ValueError, match="other: not a readable feature store"):
        FeatureStore.open(other)

    path = tmp_path / "f.zarr"
    _create(path)
    shutil.rmtree(path / "meta_val" / "C3")
    with pytest.raises(ValueError, match=r"f.zarr: array meta_val/C3 missing"):
        FeatureStore.open(path)


# ---------------------------------------------------------------------------- done / resume


def test_done_is_explicit_not_inferred_from_data(tmp_path: Path) -> None:
    path = tmp_path / "f.zarr"
    store = _create(path)
    # A never-written shard reads as zeros, exactly like a written all-zero one ...
    assert not np.any(store._array("meta_train", "C2")[10:15])
    assert store.pending("meta_train") == [0, 1, 2, 3, 4]
    # ... so only the flag tells them apart: shard 2's features are all zero and it has no boxes.
    assert materialise(store, "meta_train", _compute_meta_train, shards=[2]) == [2]
    reopened = FeatureStore.open(path)
    assert reopened.done("meta_train").tolist() == [False, False, True, False, False]
    assert reopened.pending("meta_train") == [0, 1, 3, 4]
    assert reopened.pending("meta_val") == [0, 1]


def test_read_split_of_an_incomplete_split_names_the_pending_shards(tmp_path: Path) -> None:
    store = _create(tmp_path / "f.zarr")
    materialise(store, "meta_train", _compute_meta_train, shards=[0, 2, 4])
    with pytest.raises(ValueError, match=r"'meta_train' is incomplete: 2 of 5 shards not done: \[1, 3\]"):
        store.read_split("meta_train")
    with pytest.raises(ValueError, match=r"not done: \[1, 3\]"):
        store.iter_batches("meta_train", 4)


def test_killed_materialise_resumes_only_the_rest_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []

    def compute(start: int, stop: int, fail_at: int | None = None) -> dict[str, Any]:
        calls.append((start, stop))
        if start == fail_at:
            raise RuntimeError("killed")
        return _compute_meta_train(start, stop)

    interrupted = _create(tmp_path / "interrupted.zarr")
    with pytest.raises(RuntimeError, match="killed"):
        materialise(interrupted, "meta_train", lambda a, b: compute(a, b, fail_at=10))
    assert calls == [(0, 5), (5, 10), (10, 15)]
    assert interrupted.pending("meta_train") == [2, 3, 4]

    calls.clear()
    resumed = _create(tmp_path / "interrupted.zarr")  # a re-run opens the same store
    written: list[int] = []
    assert materialise(resumed, "meta_train", compute, on_shard=written.append) == [2, 3, 4]
    assert calls == [(10, 15), (15, 20), (20, 22)] and written == [2, 3, 4]

    calls.clear()
    assert materialise(resumed, "meta_train", compute) == [] and calls == []  # nothing left

    clean = _create(tmp_path / "clean.zarr")
    materialise(clean, "meta_train", _compute_meta_train)
    _assert_same(resumed.read_split("meta_train"), clean.read_split("meta_train"))
    _assert_same(resumed.read_split("meta_train"), _expected("meta_train"))


def test_write_shard_interrupted_after_features_leaves_it_not_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.zarr"
    store = _create(path)
    materialise(store, "meta_train", _compute_meta_train, shards=[0, 1])

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    # Features get written, then the process dies before the per-sample data and the flag.
    monkeypatch.setattr(FeatureStore, "_write_samples", crash)
    with pytest.raises(OSError, match="disk full"):
        store.write_shard("meta_train", 3, **_compute_meta_train(15, 20))
    written = store._array("meta_train", "C2")[15:20]
    np.testing.assert_array_equal(written.view(np.uint16), _compute_meta_train(15, 20)["features"]["C2"].view(np.uint16))
    # A done shard that is being rewritten loses its flag before anything is overwritten.
    with pytest.raises(OSError, match="disk full"):
        store.write_shard("meta_train", 1, **_compute_meta_train(5, 10))
    monkeypatch.undo()

    assert FeatureStore.open(path).pending("meta_train") == [1, 2, 3, 4]
    calls: list[int] = []
    materialise(FeatureStore.open(path), "meta_train", lambda a, b: calls.append(a) or _compute_meta_train(a, b))
    assert calls == [5, 10, 15, 20]
    _assert_same(FeatureStore.open(path).read_split("meta_train"), _expected("meta_train"))


def _write_shards(path: str, shards: list[int]) -> list[int]:
    """One writer process: open the store itself, write its shards."""
    return materialise(FeatureStore.open(path), "meta_train", _compute_meta_train, shards=shards)


def test_two_spawned_processes_write_disjoint_shards_of_one_store(tmp_path: Path) -> None:
    path = tmp_path / "f.zarr"
    _create(path, chunk_size=1)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_write_shards, [(str(path), [0, 2, 4]), (str(path), [1, 3])])
    assert results == [[0, 2, 4], [1, 3]]
    store = FeatureStore.open(path)
    assert store.done("meta_train").all() and not store.done("meta_val").any()
    _assert_same(store.read_split("meta_train"), _expected("meta_train"))


# ---------------------------------------------------------------------------- checksums / damage


def _array_codecs(path: Path) -> dict[str, list[str]]:
    """Array path (relative to the store) -> names of its codecs, from every array's zarr.json."""
    out = {}
    for meta in sorted(path.rglob("zarr.json")):
        node = json.loads(meta.read_text())
        if node["node_type"] == "array":
            out[str(meta.parent.relative_to(path))] = [codec["name"] for codec in node["codecs"]]
    return out


def _chunk_file(path: Path, split: str, array: str, chunk: int) -> Path:
    """The chunk file of rows chunk ``chunk`` of ``split/array``, found by walking the store."""
    root = path / split / array / "c"
    found = [f for f in root.rglob("*") if f.is_file() and f.relative_to(root).parts[0] == str(chunk)]
    assert len(found) == 1, (root, chunk, found)
    return found[0]


def _garble(file: Path) -> None:
    """Flip a few bytes in the middle of ``file``: a compressor may well decode that silently."""
    data = bytearray(file.read_bytes())
    middle = max(0, len(data) // 2 - 2)
    for i in range(middle, min(middle + 4, len(data))):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def _recorded(calls: list[int]) -> Any:
    return lambda start, stop: calls.append(start // SHARD) or _compute_meta_train(start, stop)


@pytest.fixture(scope="module")
def _pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """chunk_size -> a store with all of meta_train written, to copy (cheaper than writing)."""
    out = {}
    for chunk_size in (SHARD, 1):
        path = tmp_path_factory.mktemp("pristine") / "f.zarr"
        materialise(_create(path, chunk_size=chunk_size), "meta_train", _compute_meta_train)
        out[chunk_size] = path
    return out


def _written(pristine: dict[int, Path], tmp_path: Path, chunk_size: int = SHARD) -> tuple[Path, FeatureStore]:
    path = tmp_path / "f.zarr"
    shutil.copytree(pristine[chunk_size], path)
    return path, FeatureStore.open(path)


def test_new_stores_checksum_every_array_and_old_ones_still_read(tmp_path: Path) -> None:
    new = _create(tmp_path / "new.zarr")
    materialise(new, "meta_train", _compute_meta_train, shards=[0, 2])  # shard 2: empty boxes arrays
    assert new.checksum == CHECKSUM == "crc32c"
    assert json.loads((tmp_path / "new.zarr" / "zarr.json").read_text())["attributes"]["layout"]["checksum"] == "crc32c"
    codecs = _array_codecs(tmp_path / "new.zarr")
    assert {"meta_train/C2", "meta_val/done", "meta_train/num_boxes", "meta_train/boxes/2", "meta_train/labels/0"} <= set(codecs)
    assert all(names[-1] == "crc32c" for names in codecs.values()), codecs
    assert codecs["meta_train/C2"] == ["bytes", "blosc", "crc32c"]
    # Same settings again: opens it (checksum is not part of the identity).
    assert _create(tmp_path / "new.zarr").done("meta_train").tolist() == [True, False, True, False, False]

    # A store made before checksums: no "checksum" in its layout, no crc32c anywhere.
    path = tmp_path / "old.zarr"
    old = _create(path, _checksum=False)
    assert "checksum" not in json.loads((path / "zarr.json").read_text())["attributes"]["layout"]
    materialise(old, "meta_train", _compute_meta_train, shards=[0, 1])
    again = _create(path)  # today's create() with the same settings resumes it
    assert again.checksum is None and again.pending("meta_train") == [2, 3, 4]
    materialise(again, "meta_train", _compute_meta_train)
    assert not any("crc32c" in names for names in _array_codecs(path).values())
    _assert_same(FeatureStore.open(path).read_split("meta_train"), _expected("meta_train"))
    # Without checksums a codec error is still caught (blosc header), a flipped bit is not.
    _chunk_file(path, "meta_train", "C2", 1).write_bytes(b"\xff" * 16)
    with pytest.raises(DamagedShard, match=r"array C2 shard 1 .*blosc"):
        FeatureStore.open(path).read_split("meta_train")


@pytest.mark.parametrize(
    ("array", "chunk", "shard", "damage", "error"),
    [
        ("C2", 3, 3, _garble, "checksum do not match"),  # chunk_size 5: one chunk per shard
        ("C3", 4, 4, lambda f: f.write_bytes(f.read_bytes()[:10]), "checksum do not match"),  # short last shard, truncated
        ("C3", 2, 2, Path.unlink, r"chunk file meta_train/C3/c/2/0/0/0 is missing"),  # all-zero shard 2
        ("num_boxes", 1, 1, _garble, "checksum do not match"),
        ("crop", 3, 3, Path.unlink, "is missing"),
        ("done", 4, 4, _garble, "checksum do not match"),
        ("boxes/3", 0, 3, _garble, "checksum do not match"),
        ("labels/1", 0, 1, Path.unlink, "chunk file meta_train/labels/1/c/0 is missing"),
    ],
)
def test_damaged_chunk_is_named_marked_not_done_and_recomputed(tmp_path: Path, _pristine: dict[int, Path], array: str, chunk: int, shard: int, damage: Any, error: str) -> None:
    path, _ = _written(_pristine, tmp_path)
    damage(_chunk_file(path, "meta_train", array, chunk))

    store = FeatureStore.open(path)
    start, stop = store.shard_range("meta_train", shard)
    name = array.split("/")[0]
    with pytest.raises(DamagedShard) as info:
        store.read_split("meta_train")
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert message.startswith(f"{path}: split 'meta_train': array {name} shard {shard} (samples [{start}, {stop})) is unreadable (")
    assert re.search(error, message) and message.endswith("; marked not done: run materialise again to recompute it")
    assert info.value.shards == [shard] and info.value.split == "meta_train"
    assert store.pending("meta_train") == [shard] and FeatureStore.open(path).pending("meta_train") == [shard]

    calls: list[int] = []
    assert materialise(FeatureStore.open(path), "meta_train", _recorded(calls)) == [shard] and calls == [shard]
    _assert_same(FeatureStore.open(path).read_split("meta_train"), _expected("meta_train"))


def test_read_split_reports_every_damaged_shard_at_once(tmp_path: Path, _pristine: dict[int, Path]) -> None:
    path, store = _written(_pristine, tmp_path, chunk_size=1)
    _garble(_chunk_file(path, "meta_train", "C2", 7))  # sample 7: shard 1
    _garble(_chunk_file(path, "meta_train", "C3", 8))  # shard 1 again
    _garble(_chunk_file(path, "meta_train", "labels/3", 0))
    with pytest.raises(DamagedShard) as info:
        store.read_split("meta_train", levels=["C2", "C3"])
    message = str(info.value)
    assert "\n" not in message and info.value.shards == [1, 3]
    assert "array C2 shard 1 (samples [5, 10))" in message and "array C3 shard 1" in message and "array labels shard 3" in message
    assert message.endswith("shards [1, 3] marked not done: run materialise again to recompute them")
    calls: list[int] = []
    assert materialise(store, "meta_train", _recorded(calls)) == [1, 3] and calls == [1, 3]
    _assert_same(store.read_split("meta_train"), _expected("meta_train"))


def test_iter_batches_detects_damage_on_the_call_or_in_the_batch(tmp_path: Path, _pristine: dict[int, Path]) -> None:
    path, store = _written(_pristine, tmp_path, chunk_size=1)
    order = np.random.default_rng(0).permutation(SPLITS["meta_train"])

    # A flipped bit in sample 16's C3 chunk (shard 3): the batch holding it raises.
    for prefetch in (True, False):
        _garble(_chunk_file(path, "meta_train", "C3", 16))
        batches = store.iter_batches("meta_train", 4, order=order, prefetch=prefetch)
        with pytest.raises(DamagedShard, match=r"split 'meta_train': array C3 shard 3 \(samples \[15, 20\)\) is unreadable"):
            list(batches)
        assert store.pending("meta_train") == [3]
        with pytest.raises(ValueError, match=r"not done: \[3\]"):
            store.iter_batches("meta_train", 4)
        assert materialise(store, "meta_train", _compute_meta_train) == [3]

    # A missing chunk file reads as zeros in Zarr: caught on the call, for the shards order touches.
    _chunk_file(path, "meta_train", "C3", 16).unlink()
    assert len(list(store.iter_batches("meta_train", 2, order=np.array([0, 21])))) == 1  # shards 0 and 4 are fine
    with pytest.raises(DamagedShard, match=r"array C3 shard 3 .*c/16/0/0/0 is missing"):
        store.iter_batches("meta_train", 2, order=np.array([0, 16]))
    assert materialise(store, "meta_train", _compute_meta_train) == [3]

    _garble(_chunk_file(path, "meta_train", "num_boxes", 0))  # read once, on the call
    with pytest.raises(DamagedShard, match=r"array num_boxes shard 0 .*; marked not done"):
        store.iter_batches("meta_train", 2, levels=["C3"])
    assert materialise(store, "meta_train", _compute_meta_train) == [0]
    _assert_same(store.read_split("meta_train"), _expected("meta_train"))
    (batch,) = store.iter_batches("meta_train", 22, order=order)
    want = _expected("meta_train")["features"]["C3"][order]
    np.testing.assert_array_equal(batch["features"]["C3"].view(np.uint16), want.view(np.uint16))


def test_materialise_repairs_a_damaged_done_flag_without_a_read_first(tmp_path: Path, _pristine: dict[int, Path]) -> None:
    path, _ = _written(_pristine, tmp_path)
    _garble(_chunk_file(path, "meta_train", "done", 2))
    with pytest.raises(DamagedShard, match=r"array done shard 2 .*; marked not done"):
        FeatureStore.open(path).pending("meta_train")
    assert FeatureStore.open(path).pending("meta_train") == [2]  # the flag was rewritten: readable
    _garble(_chunk_file(path, "meta_train", "done", 1))
    calls: list[int] = []
    assert materialise(FeatureStore.open(path), "meta_train", _recorded(calls)) == [1, 2] and calls == [1, 2]
    _assert_same(FeatureStore.open(path).read_split("meta_train"), _expected("meta_train"))


def test_a_read_error_that_no_shard_reproduces_is_not_damage(tmp_path: Path, _pristine: dict[int, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, store = _written(_pristine, tmp_path)
    real = store._array("meta_train", "C2")

    class Flaky:
        """C2 whose whole-array read fails once (a transient I/O error); shard reads work."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def __getitem__(self, key: Any) -> np.ndarray:
            if key is Ellipsis:
                raise OSError("transient")
            return real[key]

    monkeypatch.setitem(store._arrays, "meta_train/C2", Flaky())
    with pytest.raises(OSError, match="transient"):
        store.read_split("meta_train")
    assert store.pending("meta_train") == []


# ---------------------------------------------------------------------------- validation


def _bad(field: str) -> dict[str, Any]:
    data = _compute_meta_train(5, 10)
    if field == "features-dtype":
        data["features"]["C2"] = data["features"]["C2"].astype(np.float32)
    elif field == "features-shape":
        data["features"]["C3"] = data["features"]["C3"][:4]
    elif field == "features-missing":
        del data["features"]["C3"]
    elif field == "image_id":
        data["image_id"] = data["image_id"].astype(np.float64)
    elif field == "crop":
        data["crop"] = data["crop"][:, :2]
    elif field == "scale":
        data["scale"] = data["scale"].astype(np.float64)
    elif field == "boxes-length":
        data["boxes"] = data["boxes"][:4]
    elif field == "boxes-shape":
        data["boxes"][1] = np.zeros(4, np.float32)
    elif field == "labels-count":
        data["labels"][2] = np.zeros(len(data["labels"][2]) + 1, np.int64)
    return data


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("features-dtype", r"features\['C2'\] has dtype float32, expected float16"),
        ("features-shape", r"features\['C3'\] has shape \(4, 8, 4, 4\), expected \(5, 8, 4, 4\)"),
        ("features-missing", r"features must have exactly the levels \['C2', 'C3'\], got \['C2'\]"),
        ("image_id", "image_id has dtype float64, expected integers"),
        ("crop", r"crop has shape \(5, 2\), expected \(5, 4\)"),
        ("scale", "scale has dtype float64, expected float32"),
        ("boxes-length", "boxes must be a list of 5 arrays"),
        ("boxes-shape", r"boxes\[1\] has shape \(4,\), expected \(M, 4\)"),
        ("labels-count", r"labels\[2\] has shape \(\d+,\), expected \(\d+,\)"),
    ],
)
def test_write_shard_rejects_bad_fields_by_name_and_writes_nothing(tmp_path: Path, field: str, message: str) -> None:
    store = _create(tmp_path / "f.zarr")
    with pytest.raises(ValueError, match=r"write_shard\('meta_train', shard 1\): " + message):
        store.write_shard("meta_train", 1, **_bad(field))
    assert store.pending("meta_train") == [0, 1, 2, 3, 4]
    assert not np.any(store._array("meta_train", "C3")[:])


def test_shard_indices_and_compute_results_are_checked(tmp_path: Path) -> None:
    store = _create(tmp_path / "f.zarr")
    with pytest.raises(ValueError, match=r"shard 5 of split 'meta_train' out of range \[0, 5\)"):
        materialise(store, "meta_train", _compute_meta_train, shards=[1, 5])
    with pytest.raises(ValueError, match="unknown split 'test'"):
        store.pending("test")
    with pytest.raises(ValueError, match=r"compute\(0, 5\) .* must return keys"):
        materialise(store, "meta_train", lambda a, b: {"features": {}})
    assert store.pending("meta_train") == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------- with a real backbone


def test_tiny_backbone_features_round_trip(tmp_path: Path, synthetic_small: dict[str, Any]) -> None:
    """The compute contract end to end: dataset → transforms → backbone → store → same numbers."""
    import torch

    from nasfcos.data import SHAPES, VOCDetection, build_transforms
    from nasfcos.model.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("tiny").eval()
    dataset = VOCDetection(
        synthetic_small["voc_root"],
        image_set="train",
        classes=SHAPES,
        transforms=build_transforms(train=False, min_size=64, max_size=10**9, crop=64),
    )
    n = 10
    samples = [dataset[i] for i in range(n)]  # the crop is random: fix it once, reuse per shard
    with torch.no_grad():
        pyramid = backbone(torch.stack([image for image, _ in samples]))  # [C2..C5], (N, C, H, W)
    names = ("C2", "C3", "C4", "C5")
    levels = {name: tuple(c.shape[1:]) for name, c in zip(names, pyramid, strict=True)}

    def compute(start: int, stop: int) -> dict[str, Any]:
        targets = [t for _, t in samples[start:stop]]
        return {
            "features": {name: c[start:stop].half().numpy() for name, c in zip(names, pyramid, strict=True)},
            "image_id": np.array([t["image_id"] for t in targets]),
            "crop": np.stack([t["crop"].numpy() for t in targets]),
            "scale": np.stack([t["scale"].numpy() for t in targets]),
            "boxes": [t["boxes"].numpy() for t in targets],
            "labels": [t["labels"].numpy() for t in targets],
        }

    store = FeatureStore.create(tmp_path / "f.zarr", splits={"meta_train": n}, levels=levels, shard_size=4, attrs={"crop": 64})
    assert materialise(store, "meta_train", compute) == [0, 1, 2]
    got = store.read_split("meta_train")
    _assert_same(got, compute(0, n))
    assert got["crop"][0].tolist()[2] - got["crop"][0].tolist()[0] == 64
