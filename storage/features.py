"""Feature store: backbone features of the proxy task, cached once, read by thousands of decoders.

NAS-FCOS §3.3 ("fast decoder adaptation") keeps the backbone fixed during search, so its
outputs C2..C5 on the meta-train / meta-val images (384x384 crops, §4.1) are computed once
and every sampled decoder trains on the cache. This module is that cache: a Zarr v3 store
written in *shards* of consecutive samples by independent (possibly parallel) writers, with
an explicit per-shard ``done`` flag so that a killed materialisation resumes where it
stopped. It knows nothing about models: the caller passes a ``compute(start, stop)``
function (the backbone forward) and plain numpy arrays.

Legend: N samples of a split, S shards of a split, B samples of a shard or batch,
C/H/W channels/height/width of one level, M boxes of one sample, Ms boxes of one shard.

Layout on disk (``features.zarr``)::

    zarr.json                 root group; attributes: format, layout (splits, levels,
                              shard_size, chunk_size, codec, checksum), user_attrs (the caller's:
                              checkpoint hash, split seed, crop size, ...), versions
                              (zarr, numcodecs, numpy, python), created_at
    <split>/                  one group per split; attributes: num_samples, num_shards
      <level>                 float16 (N, C, H, W); chunks (chunk_size, C, H, W)
      image_id                int64 (N,)        one chunk per shard
      crop                    int32 (N, 4)      x0, y0, x1, y1 in resized-image pixels
      scale                   float32 (N, 2)    resize factors as the caller gives them
      num_boxes               int64 (N,)        boxes per sample (ragged counts)
      boxes/<shard>           float32 (Ms, 4)   x1y1x2y2 in the crop frame, one array per shard
      labels/<shard>          int64 (Ms,)       one array per shard
      done                    bool (S,)         one chunk per shard, set last

Why this shape:

- No two shards share a chunk (``chunk_size`` divides ``shard_size``; per-sample metadata
  uses one chunk per shard, not per sample, to avoid thousands of few-byte files), so
  parallel writers of different shards never touch the same file; LocalStore writes each
  chunk by temp file + rename.
- Ragged values are stored per shard because a writer cannot know where its boxes start
  in a concatenation before earlier shards are written; offsets are derived from
  ``num_boxes`` at read time.
- ``done[k]`` is cleared first and set only after all of shard k is written; it is the
  only completeness signal. File existence is not one: Zarr may skip all-fill chunks.
  Arrays are opened with ``write_empty_chunks=True`` anyway, so what was written is on disk.
- A new store is built in a temporary directory and renamed into place, so a crash during
  creation never leaves a half-made store that a later ``create`` would have to judge.
- Every array of a new store ends its codec chain with a CRC-32C checksum (layout
  ``"checksum": "crc32c"``), so a flipped bit fails the read instead of decoding to garbage.
  Stores made before that (no ``"checksum"`` key: none) open and read as before.

Damage: a read (``read_split``, ``iter_batches``, ``done``/``pending``, ``nbytes``) that meets
an unreadable chunk (bad checksum, a codec error, a truncated or garbled file, a missing chunk
file or ragged array of a done shard, ragged rows that disagree with ``num_boxes``) finds
the shard(s) holding it, clears their ``done`` flags and raises :class:`DamagedShard` (a
ValueError), one line naming the store, split, array, shard and sample range. Nothing is
returned from a damaged split; ``materialise`` then recomputes exactly those shards.

Example:
    >>> store = FeatureStore.create("features.zarr", splits={"meta_val": 1715},
    ...     levels={"C3": (512, 48, 48)}, shard_size=64, attrs={"seed": 0})  # doctest: +SKIP
    >>> materialise(store, "meta_val", compute)  # doctest: +SKIP
    >>> data = store.read_split("meta_val")  # {"features": {"C3": (N, 512, 48, 48)}, ...}  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

__all__ = [
    "CHECKSUM",
    "CODECS",
    "DEFAULT_CODEC",
    "FORMAT",
    "DamagedShard",
    "FeatureStore",
    "materialise",
]

# Unchanged by the checksums: older stores (no layout "checksum") read as they are, and the
# crc32c codec is a standard Zarr v3 one that any zarr 3 reads.
FORMAT = "nasfcos.features/1"
# Checksum codec appended to every array of a new store (layout field "checksum").
CHECKSUM = "crc32c"

# Codec names -> zarr v3 compressor lists (None = stored raw). Bitshuffle groups the bits
# of fp16 activations by position (sign/exponent bits of neighbours are alike), which helps
# on ResNet-50 features; see benchmarks/RESULTS.md for measured ratios and speeds.
CODECS: dict[str, Callable[[], tuple[Any, ...] | None]] = {
    "none": lambda: None,
    "blosc-lz4": lambda: (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),),
    "blosc-zstd": lambda: (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),),
    "zstd": lambda: (ZstdCodec(level=3),),
}
# Chosen from benchmarks/feature_store.py (benchmarks/RESULTS.md, "Feature store codecs"):
# the proxy reads the cache far more often than it writes it. On ResNet-50 features
# blosc-lz4 read about as fast as 'none' (the fastest of the compressors) at a 1.65x
# ratio; blosc-zstd gave 1.87x but read ~2.6x and wrote ~6x slower.
DEFAULT_CODEC = "blosc-lz4"

# Auto chunk_size: the largest divisor of shard_size whose chunk of the biggest level stays
# under this many bytes. Small chunks keep shuffled (random-order) batch reads cheap; a few
# MiB per chunk is already large enough for the codecs and the file system.
_TARGET_CHUNK_BYTES = 4 << 20

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_META_ARRAYS = ("image_id", "crop", "scale", "num_boxes", "done")
_RAGGED = ("boxes", "labels")
_RESERVED = frozenset(_META_ARRAYS + _RAGGED + ("features",))
_SAMPLE_FIELDS = ("features", "image_id", "crop", "scale", "boxes", "labels")
# (dtype, trailing shape) of the per-sample metadata arrays.
_META_SPEC: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "image_id": (np.dtype(np.int64), ()),
    "crop": (np.dtype(np.int32), (4,)),
    "scale": (np.dtype(np.float32), (2,)),
    "num_boxes": (np.dtype(np.int64), ()),
}
_ARRAY_CONFIG = {"write_empty_chunks": True}
_SHOWN = 20  # pending shards listed in an error before "..."
_ERROR_CHARS = 160  # of an original error quoted in a DamagedShard message
# Errors of a read that say nothing about the data: never blamed on a shard.
_NOT_DAMAGE = (PermissionError, MemoryError)


class DamagedShard(ValueError):
    """Done shard(s) whose stored data could not be read back; their ``done`` flags are cleared.

    Raised by the read paths of :class:`FeatureStore`; ``materialise`` recomputes the shards.

    Attributes:
        path: the store directory.
        split: the split read.
        shards: the damaged shards, ascending.
        damage: ``(array, shard, error)`` per unreadable array of a shard; ``array`` is a
            level, a per-sample array, ``done``, ``boxes`` or ``labels``.
    """

    def __init__(self, message: str, *, path: Path, split: str, damage: list[tuple[str, int, str]]) -> None:
        super().__init__(message)
        self.path = path
        self.split = split
        self.damage = damage
        self.shards = sorted({shard for _, shard, _ in damage})


def _short(error: BaseException) -> str:
    """``error`` as one short line: its type and the start of its message."""
    text = " ".join(str(error).split())
    text = re.sub(r"(checksum do not match)\. Stored: .*", r"\1", text)  # zarr's crc32c codec adds raw bytes
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 3] + "..."


def _versions() -> dict[str, str]:
    return {
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _jsonable(value: Any, where: str) -> Any:
    """``value`` after a JSON round trip (tuples become lists), so comparisons match the file."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} must be JSON-serialisable: {e}") from None


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or name in _RESERVED:
        raise ValueError(f"{what} name {name!r}: must match {_NAME.pattern} and not be one of {sorted(_RESERVED)}")


def _codec_compressors(codec: str) -> tuple[Any, ...] | None:
    if codec not in CODECS:
        raise ValueError(f"codec={codec!r}: must be one of {', '.join(CODECS)}")
    return CODECS[codec]()


def _compressors(codec: str, checksum: str | None) -> tuple[Any, ...] | None:
    """The bytes-to-bytes codecs of an array: ``codec``'s, then the checksum (if any) last."""
    compressors = _codec_compressors(codec)
    if checksum is None:
        return compressors
    return (*(compressors or ()), Crc32cCodec())


def _auto_chunk_size(shard_size: int, levels: Mapping[str, Sequence[int]]) -> int:
    per_sample = max(2 * math.prod(shape) for shape in levels.values())  # fp16 bytes
    fits = max(1, _TARGET_CHUNK_BYTES // per_sample)
    return max(d for d in range(1, shard_size + 1) if shard_size % d == 0 and d <= fits)


def _describe_shards(shards: Sequence[int]) -> str:
    shown = ", ".join(str(s) for s in shards[:_SHOWN])
    return "[" + shown + (", ..." if len(shards) > _SHOWN else "") + "]"


class FeatureStore:
    """Backbone features C2..C5 of the proxy-task splits (NAS-FCOS §3.3, §4.1) in a Zarr v3 store.

    Build with :meth:`create` (idempotent: same layout and attrs → opens the existing
    store, so a re-run resumes) or :meth:`open`. Write with :meth:`write_shard` or
    :func:`materialise`; read with :meth:`read_split` (all in memory) or
    :meth:`iter_batches` (streaming). Several processes may write *different* shards of
    one store at once, each through its own ``FeatureStore.open``.

    Attributes:
        path: the store directory.
        splits: split name -> number of samples N.
        levels: level name -> (C, H, W).
        shard_size: samples per shard (the last shard of a split may be shorter).
        chunk_size: samples per feature chunk; divides ``shard_size``.
        codec: one of :data:`CODECS`.
        checksum: :data:`CHECKSUM` on every array, or None (a store made before checksums).
        attrs: the caller's attributes given to :meth:`create`.
        versions: zarr/numcodecs/numpy/python versions that created the store.
        created_at: ISO 8601 UTC time of creation.
    """

    def __init__(self, path: Path, root: zarr.Group) -> None:
        """Use :meth:`create` or :meth:`open`; this wraps an opened, validated root group."""
        meta = root.attrs.asdict()
        layout = meta["layout"]
        self.path = path
        self.splits: dict[str, int] = {k: int(v) for k, v in layout["splits"].items()}
        self.levels: dict[str, tuple[int, int, int]] = {k: tuple(v) for k, v in layout["levels"].items()}  # type: ignore[misc]
        self.shard_size: int = int(layout["shard_size"])
        self.chunk_size: int = int(layout["chunk_size"])
        self.codec: str = layout["codec"]
        self.checksum: str | None = layout.get("checksum")  # absent in stores made before checksums
        self.attrs: dict[str, Any] = meta["user_attrs"]
        self.versions: dict[str, str] = meta["versions"]
        self.created_at: str = meta["created_at"]
        self._root = root
        self._arrays: dict[str, zarr.Array] = {}

    def __repr__(self) -> str:
        splits = ", ".join(f"{k}={n}" for k, n in self.splits.items())
        return f"FeatureStore({str(self.path)!r}, splits({splits}), levels={list(self.levels)}, codec={self.codec!r})"

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        splits: Mapping[str, int],
        levels: Mapping[str, Sequence[int]],
        shard_size: int,
        chunk_size: int | None = None,
        codec: str = DEFAULT_CODEC,
        attrs: Mapping[str, Any],
        _checksum: bool = True,
    ) -> FeatureStore:
        """Create the store at ``path``, or open it if it exists with the same layout and attrs.

        Args:
            splits: split name -> number of samples (>= 1).
            levels: level name -> (C, H, W) of its float16 feature maps.
            shard_size: samples per shard, the unit of writing, resuming and parallelism.
            chunk_size: samples per feature chunk, must divide ``shard_size``; None picks the
                largest divisor whose biggest-level chunk stays under 4 MiB.
            codec: compressor for every array, one of :data:`CODECS`.
            attrs: JSON-serialisable provenance (checkpoint hash, split seed, crop size, ...),
                part of the identity: a different value is an error, not a silent reuse.
            _checksum: False builds a store without checksums, as before them (for tests).
                Not part of the identity: an existing store opens either way.

        Raises:
            ValueError: bad arguments, or an existing store whose layout or attrs differ
                (the message names the field), or ``path`` holding something else.
        """
        path = Path(path)
        layout = cls._layout(splits, levels, shard_size, chunk_size, codec)
        user_attrs = _jsonable(dict(attrs), "attrs")
        if not (path / "zarr.json").exists():
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise ValueError(f"{path}: exists and is not a feature store (no zarr.json); refusing to write into it")
            cls._build(path, {**layout, "checksum": CHECKSUM} if _checksum else layout, user_attrs)
        store = cls.open(path)
        store._check_same(layout, user_attrs)
        return store

    @staticmethod
    def _layout(
        splits: Mapping[str, int],
        levels: Mapping[str, Sequence[int]],
        shard_size: int,
        chunk_size: int | None,
        codec: str,
    ) -> dict[str, Any]:
        if not splits:
            raise ValueError("splits: need at least one split")
        for name, n in splits.items():
            _check_name(name, "split")
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"splits[{name!r}]={n!r}: must be a positive integer")
        if not levels:
            raise ValueError("levels: need at least one level")
        for name, shape in levels.items():
            _check_name(name, "level")
            if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
                raise ValueError(f"levels[{name!r}]={tuple(shape)!r}: must be (C, H, W) positive integers")
        if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
            raise ValueError(f"shard_size={shard_size!r}: must be a positive integer")
        if chunk_size is None:
            chunk_size = _auto_chunk_size(int(shard_size), levels)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1 or shard_size % chunk_size:
            raise ValueError(f"chunk_size={chunk_size!r}: must be a positive divisor of shard_size={shard_size}")
        _codec_compressors(codec)
        return {
            "splits": {k: int(v) for k, v in splits.items()},
            "levels": {k: [int(s) for s in v] for k, v in levels.items()},
            "shard_size": int(shard_size),
            "chunk_size": int(chunk_size),
            "codec": codec,
        }

    @staticmethod
    def _build(path: Path, layout: dict[str, Any], user_attrs: dict[str, Any]) -> None:
        """Write a new store next to ``path`` and rename it into place (atomic for a crash or a race)."""
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            root = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
            checksum = layout.get("checksum")
            compressors = _compressors(layout["codec"], checksum)
            shard_size, chunk_size = layout["shard_size"], layout["chunk_size"]
            for split, n in layout["splits"].items():
                num_shards = -(-n // shard_size)
                group = root.create_group(split, attributes={"num_samples": n, "num_shards": num_shards})
                for level, (c, h, w) in layout["levels"].items():
                    group.create_array(
                        level,
                        shape=(n, c, h, w),
                        chunks=(chunk_size, c, h, w),
                        dtype="float16",
                        fill_value=0,
                        compressors=compressors,
                    )
                for name, (dtype, tail) in _META_SPEC.items():
                    group.create_array(
                        name,
                        shape=(n, *tail),
                        chunks=(shard_size, *tail),
                        dtype=dtype,
                        fill_value=0,
                        compressors=compressors,
                    )
                # One chunk per flag: writers of different shards never rewrite each other's.
                group.create_array(
                    "done",
                    shape=(num_shards,),
                    chunks=(1,),
                    dtype=bool,
                    fill_value=False,
                    **({"compressors": _compressors("none", checksum)} if checksum else {}),
                )
                for name in _RAGGED:
                    group.create_group(name)
            # Root attributes last: a store without them is not one (open() says so).
            root.attrs.put(
                {
                    "format": FORMAT,
                    "layout": layout,
                    "user_attrs": user_attrs,
                    "versions": _versions(),
                    "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                }
            )
            try:
                os.rename(tmp, path)  # replaces an empty directory; fails if another creator won
            except OSError:
                if not (path / "zarr.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check_same(self, layout: dict[str, Any], user_attrs: dict[str, Any]) -> None:
        # ``layout`` is the identity (no "checksum": a store with or without checksums holds
        # the same data, so create() opens either); keys only the existing store has are ignored.
        for key, want in layout.items():
            have = self._root.attrs["layout"][key]
            if have != want:
                raise ValueError(f"{self.path}: existing store has {key}={have!r}, requested {key}={want!r}")
        have_attrs = self.attrs
        for key in sorted(set(have_attrs) | set(user_attrs)):
            have, want = have_attrs.get(key, "<missing>"), user_attrs.get(key, "<missing>")
            if have != want:
                raise ValueError(f"{self.path}: existing store has attrs[{key!r}]={have!r}, requested {want!r}")

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open an existing store, checking that every array has the shape its layout says.

        Raises:
            FileNotFoundError: nothing at ``path``.
            ValueError: ``path`` is not a (complete, readable) feature store; one line naming it.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no feature store there (path does not exist)")
        try:
            root = zarr.open_group(str(path), mode="r+", zarr_format=3)
            fmt = root.attrs.get("format")
        except Exception as e:  # noqa: BLE001 - zarr raises several types for missing / malformed metadata
            raise ValueError(f"{path}: not a readable feature store ({' '.join(str(e).split()) or type(e).__name__})") from None
        if fmt != FORMAT:
            raise ValueError(f"{path}: not a feature store (root attribute format={fmt!r}, expected {FORMAT!r})")
        store = cls(path, root)
        if store.checksum not in (None, CHECKSUM):
            raise ValueError(f"{path}: unknown checksum {store.checksum!r} in the layout (this code knows {CHECKSUM!r})")
        for split in store.splits:
            for name, (dtype, shape) in store._expected_arrays(split).items():
                try:
                    array = store._array(split, name)
                except Exception as e:  # noqa: BLE001 - zarr raises several types for a missing or damaged array
                    raise ValueError(f"{path}: array {split}/{name} missing or unreadable ({' '.join(str(e).split())})") from None
                if array.shape != shape or array.dtype != dtype:
                    raise ValueError(f"{path}: array {split}/{name} is {array.dtype}{array.shape}, layout says {dtype}{shape}")
        return store

    def _expected_arrays(self, split: str) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        n = self.splits[split]
        expected = {level: (np.dtype(np.float16), (n, *chw)) for level, chw in self.levels.items()}
        expected.update({name: (dtype, (n, *tail)) for name, (dtype, tail) in _META_SPEC.items()})
        expected["done"] = (np.dtype(bool), (self.num_shards(split),))
        return expected

    def _array(self, split: str, name: str) -> zarr.Array:
        key = f"{split}/{name}"
        if key not in self._arrays:
            self._arrays[key] = zarr.open_array(str(self.path), path=key, mode="r+", zarr_format=3).with_config(_ARRAY_CONFIG)
        return self._arrays[key]

    # ------------------------------------------------------------------ shards

    def _check_split(self, split: str) -> int:
        if split not in self.splits:
            raise ValueError(f"{self.path}: unknown split {split!r} (store has {', '.join(self.splits)})")
        return self.splits[split]

    def _check_levels(self, levels: Iterable[str] | None) -> list[str]:
        if levels is None:
            return list(self.levels)
        levels = list(levels)
        unknown = [level for level in levels if level not in self.levels]
        if unknown:
            raise ValueError(f"{self.path}: unknown levels {unknown} (store has {', '.join(self.levels)})")
        return levels

    def num_shards(self, split: str) -> int:
        """Number of shards S of ``split``: ceil(N / shard_size)."""
        return -(-self._check_split(split) // self.shard_size)

    def shard_range(self, split: str, shard: int) -> tuple[int, int]:
        """Sample range ``[start, stop)`` of ``shard``; the last shard may be shorter."""
        n, s = self._check_split(split), self.num_shards(split)
        if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or not 0 <= shard < s:
            raise ValueError(f"{self.path}: shard {shard!r} of split {split!r} out of range [0, {s})")
        start = int(shard) * self.shard_size
        return start, min(start + self.shard_size, n)

    def done(self, split: str) -> np.ndarray:
        """bool (S,): which shards of ``split`` are completely written.

        Raises:
            DamagedShard: some flags are unreadable; they are rewritten as not done, so the
                next call reads them (a missing flag file reads as not done anyway).
        """
        self._check_split(split)
        damage: list[tuple[str, int, str]] = []
        done = self._read_checked(split, "done", range(self.num_shards(split)), damage, check_files=False)
        self._raise_damage(split, damage)
        return np.asarray(done, dtype=bool)

    def pending(self, split: str) -> list[int]:
        """Shards of ``split`` not yet completely written, ascending (raises as :meth:`done`)."""
        return [int(k) for k in np.flatnonzero(~self.done(split))]

    def write_shard(
        self,
        split: str,
        shard: int,
        *,
        features: Mapping[str, np.ndarray],
        image_id: np.ndarray,
        crop: np.ndarray,
        scale: np.ndarray,
        boxes: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
    ) -> None:
        """Validate and write all of ``shard``, then mark it done (rewrites a done shard).

        With B = the shard's length (``shard_range``):

        Args:
            features: every level -> float16 (B, C, H, W).
            image_id: integer (B,).
            crop: integer (B, 4), x0 y0 x1 y1 of the crop in resized-image pixels.
            scale: float (B, 2), resize factors (nasfcos transforms give [sy, sx]).
            boxes: B arrays float (M_i, 4), x1y1x2y2 in the crop frame; M_i may be 0.
            labels: B arrays integer (M_i,).

        Raises:
            ValueError: a field has the wrong type, dtype or shape (the message names it).
                Nothing is written then.
        """
        start, stop = self.shard_range(split, shard)
        data = self._validate(split, shard, stop - start, features, image_id, crop, scale, boxes, labels)
        done = self._array(split, "done")
        # Clear first: a rewrite that dies half-way must not leave the old flag claiming it.
        done[shard] = False
        self._write_features(split, start, stop, data["features"])
        self._write_samples(split, shard, start, stop, data)
        done[shard] = True

    def _validate(
        self,
        split: str,
        shard: int,
        size: int,
        features: Mapping[str, np.ndarray],
        image_id: np.ndarray,
        crop: np.ndarray,
        scale: np.ndarray,
        boxes: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
    ) -> dict[str, Any]:
        where = f"write_shard({split!r}, shard {shard})"

        def array(value: Any, field: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
            if not isinstance(value, np.ndarray):
                raise ValueError(f"{where}: {field} must be a numpy array, got {type(value).__name__}")
            if value.shape != shape:
                raise ValueError(f"{where}: {field} has shape {value.shape}, expected {shape}")
            if dtype.kind == "i":
                # Any integer dtype whose values fit (torch gives int64 crops).
                if value.dtype.kind not in "iu":
                    raise ValueError(f"{where}: {field} has dtype {value.dtype}, expected integers ({dtype})")
                info = np.iinfo(dtype)
                if value.size and (value.min() < info.min or value.max() > info.max):
                    raise ValueError(f"{where}: {field} has values outside {dtype}")
            elif not np.can_cast(value.dtype, dtype, casting="safe"):
                raise ValueError(f"{where}: {field} has dtype {value.dtype}, expected {dtype} (cast it first)")
            return np.ascontiguousarray(value, dtype=dtype)

        if not isinstance(features, Mapping) or set(features) != set(self.levels):
            got = sorted(features) if isinstance(features, Mapping) else type(features).__name__
            raise ValueError(f"{where}: features must have exactly the levels {list(self.levels)}, got {got}")
        out: dict[str, Any] = {"features": {}}
        for level, chw in self.levels.items():
            value = features[level]
            if isinstance(value, np.ndarray) and value.dtype != np.float16:
                # Strict: a silent float32 -> float16 cast would hide a caller's overflow to inf.
                raise ValueError(f"{where}: features[{level!r}] has dtype {value.dtype}, expected float16")
            out["features"][level] = array(value, f"features[{level!r}]", np.dtype(np.float16), (size, *chw))
        out["image_id"] = array(image_id, "image_id", np.dtype(np.int64), (size,))
        out["crop"] = array(crop, "crop", np.dtype(np.int32), (size, 4))
        out["scale"] = array(scale, "scale", np.dtype(np.float32), (size, 2))
        for field, values in (("boxes", boxes), ("labels", labels)):
            if isinstance(values, np.ndarray) or not isinstance(values, Sequence) or len(values) != size:
                got = f"length {len(values)}" if isinstance(values, Sequence) else type(values).__name__
                raise ValueError(f"{where}: {field} must be a list of {size} arrays (one per sample), got {got}")
        out["boxes"], out["labels"] = [], []
        for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
            if isinstance(b, np.ndarray) and (b.ndim != 2 or b.shape[1] != 4):
                raise ValueError(f"{where}: boxes[{i}] has shape {b.shape}, expected (M, 4)")
            out["boxes"].append(array(b, f"boxes[{i}]", np.dtype(np.float32), getattr(b, "shape", ())))
            # labels[i] must match boxes[i]: (M,) with the same M.
            out["labels"].append(array(lab, f"labels[{i}]", np.dtype(np.int64), (len(b),)))
        return out

    def _write_features(self, split: str, start: int, stop: int, features: Mapping[str, np.ndarray]) -> None:
        for level, values in features.items():
            self._array(split, level)[start:stop] = values

    def _write_samples(self, split: str, shard: int, start: int, stop: int, data: Mapping[str, Any]) -> None:
        """Per-sample metadata and this shard's ragged boxes/labels."""
        self._array(split, "image_id")[start:stop] = data["image_id"]
        self._array(split, "crop")[start:stop] = data["crop"]
        self._array(split, "scale")[start:stop] = data["scale"]
        self._array(split, "num_boxes")[start:stop] = np.array([len(b) for b in data["boxes"]], dtype=np.int64)
        compressors = _compressors(self.codec, self.checksum)
        for name, parts, tail, dtype in (
            ("boxes", data["boxes"], (4,), np.float32),
            ("labels", data["labels"], (), np.int64),
        ):
            values = np.concatenate(parts) if parts else np.zeros((0, *tail), dtype)  # (Ms, *tail)
            zarr.create_array(
                store=str(self.path),
                name=f"{split}/{name}/{shard}",
                shape=values.shape,
                chunks=(max(len(values), 1), *tail),
                dtype=dtype,
                fill_value=0,
                compressors=compressors,
                overwrite=True,
                config=_ARRAY_CONFIG,
            )[...] = values

    # ------------------------------------------------------------------ read

    def _require_done(self, split: str) -> None:
        pending = self.pending(split)
        if pending:
            raise ValueError(
                f"{self.path}: split {split!r} is incomplete: {len(pending)} of {self.num_shards(split)} "
                f"shards not done: {_describe_shards(pending)} (run materialise to finish them)"
            )

    # ------------------------------------------------------------------ damage

    def _rows(self, split: str, name: str, shard: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of array ``name`` that belong to ``shard``."""
        return (shard, shard + 1) if name == "done" else self.shard_range(split, shard)

    def _missing_chunks(self, split: str, name: str, shards: Iterable[int]) -> list[tuple[str, int, str]]:
        """Damage for each of ``shards`` missing a chunk file of ``name`` (Zarr would read fill values)."""
        array = self._array(split, name)
        rows, tail = array.chunks[0], (0,) * (array.ndim - 1)
        base = os.path.join(str(self.path), split, name)
        damage = []
        for shard in shards:
            start, stop = self._rows(split, name, shard)
            for chunk in range(start // rows, -(-stop // rows)):
                key = array.metadata.encode_chunk_key((chunk, *tail))
                if not os.path.exists(os.path.join(base, key)):
                    damage.append((name, shard, f"chunk file {split}/{name}/{key} is missing"))
                    break
        return damage

    def _read_checked(
        self,
        split: str,
        name: str,
        shards: Iterable[int],
        damage: list[tuple[str, int, str]],
        read: Callable[[zarr.Array], np.ndarray] | None = None,
        *,
        check_files: bool = True,
    ) -> np.ndarray | None:
        """``read(array)`` (default: all of it), whose chunks lie in ``shards``, or None on damage.

        Damage (missing chunk files of those shards, or the shards whose own re-read fails
        when the read fails) is appended to ``damage``. An error that no single shard
        reproduces is not damage: it is raised as it is.
        """
        shards = list(shards)
        array = self._array(split, name)
        found = self._missing_chunks(split, name, shards) if check_files else []
        try:
            values = array[...] if read is None else read(array)
        except _NOT_DAMAGE:
            raise
        except Exception as error:
            located = []
            for shard in shards:
                start, stop = self._rows(split, name, shard)
                try:
                    array[start:stop]
                except _NOT_DAMAGE:
                    raise
                except Exception as e:  # noqa: BLE001 - any read error means the chunk is damaged
                    located.append((name, shard, _short(e)))
            if not located:
                raise error
            found.extend(located)
        damage.extend(found)
        return None if found else values

    def _raise_damage(self, split: str, damage: list[tuple[str, int, str]]) -> None:
        """Clear the done flags of the damaged shards and raise one line about them (if any)."""
        if not damage:
            return
        unique: dict[tuple[str, int], str] = {}
        for name, shard, error in damage:
            unique.setdefault((name, shard), error)
        damage = [(name, shard, error) for (name, shard), error in unique.items()]
        shards = sorted({shard for _, shard, _ in damage})
        done = self._array(split, "done")
        marked = "marked not done"
        try:
            for shard in shards:
                done[shard] = False  # a whole chunk: written without reading the old one
        except Exception as e:  # noqa: BLE001 - reported with the damage, not raised over it
            marked = f"could not mark not done ({_short(e)})"
        parts = []
        for name, shard, error in damage[:3]:
            start, stop = self.shard_range(split, shard)
            parts.append(f"array {name} shard {shard} (samples [{start}, {stop})) is unreadable ({error})")
        if len(damage) > 3:
            parts.append(f"{len(damage) - 3} more arrays of shards are unreadable")
        if len(shards) == 1:
            tail = f"{marked}: run materialise again to recompute it"
        else:
            tail = f"shards {_describe_shards(shards)} {marked}: run materialise again to recompute them"
        raise DamagedShard(f"{self.path}: split {split!r}: {'; '.join(parts)}; {tail}", path=self.path, split=split, damage=damage)

    # ------------------------------------------------------------------ read

    def _ragged(self, split: str, name: str, counts: np.ndarray, damage: list[tuple[str, int, str]], skip: set[int]) -> list[np.ndarray]:
        """Per-sample arrays of ``name`` for all of ``split``, split by ``counts`` (N,).

        Shards in ``skip`` (whose counts are unreadable) are not read; damaged shards are
        appended to ``damage`` and give no values.
        """
        out: list[np.ndarray] = []
        for shard in range(self.num_shards(split)):
            if shard in skip:
                continue
            start, stop = self.shard_range(split, shard)
            out.extend(self._ragged_shard(split, name, shard, counts[start:stop], damage))
        return out

    def _ragged_shard(self, split: str, name: str, shard: int, counts: np.ndarray, damage: list[tuple[str, int, str]]) -> list[np.ndarray]:
        key = f"{split}/{name}/{shard}"
        try:
            array = zarr.open_array(str(self.path), path=key, mode="r", zarr_format=3)
            rows = int(counts.sum())
            if array.shape[0] != rows:
                raise ValueError(f"{key} has {array.shape[0]} rows but num_boxes says {rows}")
            chunk = array.metadata.encode_chunk_key((0,) * array.ndim)
            # One chunk, written when the shard has boxes (none for an empty array).
            missing = rows > 0 and not os.path.exists(os.path.join(str(self.path), key, chunk))
            values = None if missing else array[...]
        except _NOT_DAMAGE:
            raise
        except Exception as e:  # noqa: BLE001 - any read error means the chunk is damaged
            damage.append((name, shard, _short(e)))
            return []
        if values is None:
            damage.append((name, shard, f"chunk file {key}/{chunk} is missing"))
            return []
        offsets = np.concatenate([[0], np.cumsum(counts)])  # (B + 1,)
        return [values[offsets[i] : offsets[i + 1]] for i in range(len(counts))]

    def _read_ragged(self, split: str, damage: list[tuple[str, int, str]]) -> tuple[np.ndarray, list, list]:
        """``num_boxes`` (N,) and the per-sample boxes and labels of all of ``split``."""
        shards = range(self.num_shards(split))
        counts = self._read_checked(split, "num_boxes", shards, damage)
        skip = {shard for name, shard, _ in damage if name == "num_boxes"}
        if counts is None:  # the other shards' counts still check their own boxes and labels
            array, counts = self._array(split, "num_boxes"), np.zeros(self.splits[split], np.int64)
            for shard in shards:
                if shard not in skip:
                    start, stop = self.shard_range(split, shard)
                    counts[start:stop] = array[start:stop]
        return counts, self._ragged(split, "boxes", counts, damage, skip), self._ragged(split, "labels", counts, damage, skip)

    def read_split(self, split: str, levels: Iterable[str] | None = None) -> dict[str, Any]:
        """All of ``split`` in memory.

        Returns:
            ``{"features": {level: float16 (N, C, H, W)}, "image_id": int64 (N,), "crop":
            int32 (N, 4), "scale": float32 (N, 2), "boxes": N x float32 (M, 4), "labels":
            N x int64 (M,)}`` — the same keys ``write_shard`` takes.

        Raises:
            ValueError: some shard is not done (the message lists them).
            DamagedShard: some done shard's data is unreadable; its flag is cleared. All the
                requested arrays are read before raising, so every damaged shard among them
                is named and one ``materialise`` repairs them all.
        """
        self._check_split(split)
        levels = self._check_levels(levels)
        self._require_done(split)
        shards = range(self.num_shards(split))
        damage: list[tuple[str, int, str]] = []
        counts, boxes, labels = self._read_ragged(split, damage)
        out = {
            "features": {level: self._read_checked(split, level, shards, damage) for level in levels},
            **{name: self._read_checked(split, name, shards, damage) for name in ("image_id", "crop", "scale")},
            "boxes": boxes,
            "labels": labels,
        }
        self._raise_damage(split, damage)
        return out

    def iter_batches(
        self,
        split: str,
        batch_size: int,
        levels: Iterable[str] | None = None,
        order: Sequence[int] | np.ndarray | None = None,
        *,
        prefetch: bool = True,
    ) -> Iterator[dict[str, Any]]:
        """Stream ``split`` in batches without loading it whole.

        Args:
            batch_size: samples per batch (the last one may be smaller).
            levels: levels to read (default all).
            order: sample indices in the order wanted (a permutation for a shuffled epoch,
                or any subset); default 0..N-1. Reads touch only the chunks of the batch's
                samples, so with chunk_size > 1 a shuffled order reads more than it returns.
            prefetch: read the next batch in a background thread while the caller works.

        Yields:
            ``read_split``'s dict restricted to the batch, plus ``"index"``: int64 (B,) the
            batch's sample indices.

        Raises:
            ValueError: some shard is not done, or ``order`` is not indices into the split.
            DamagedShard: on the call, if boxes, labels or ``num_boxes`` of some shard are
                unreadable or a chunk file of a shard that ``order`` touches is missing; from
                a batch, if its chunks are unreadable. The damaged shards' flags are cleared.
        """
        n = self._check_split(split)
        levels = self._check_levels(levels)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
        index = np.arange(n, dtype=np.int64) if order is None else np.asarray(order)
        if index.ndim != 1 or index.dtype.kind not in "iu" or (index.size and (index.min() < 0 or index.max() >= n)):
            raise ValueError(f"order: must be a 1-D array of sample indices in [0, {n}), got {index.dtype}{index.shape}")
        self._require_done(split)
        index = index.astype(np.int64)
        names = [*levels, "image_id", "crop", "scale"]
        # Boxes and labels are a few bytes per sample: read them once, stream only features.
        damage: list[tuple[str, int, str]] = []
        _, boxes, labels = self._read_ragged(split, damage)
        touched = np.unique(index // self.shard_size).tolist()
        for name in names:  # chunk files of done shards must all exist: Zarr reads gaps as zeros
            damage.extend(self._missing_chunks(split, name, touched))
        self._raise_damage(split, damage)

        def load(batch: np.ndarray) -> dict[str, Any]:
            contiguous = batch.size > 0 and batch[-1] - batch[0] + 1 == batch.size and np.all(np.diff(batch) == 1)
            shards = np.unique(batch // self.shard_size).tolist()
            damage: list[tuple[str, int, str]] = []

            def read(array: zarr.Array) -> np.ndarray:
                if contiguous:
                    return array[int(batch[0]) : int(batch[-1]) + 1]
                # Orthogonal selection wants sorted unique indices; map back to the batch order.
                unique, inverse = np.unique(batch, return_inverse=True)
                return array.get_orthogonal_selection((unique,))[inverse]

            def take(name: str) -> np.ndarray | None:
                return self._read_checked(split, name, shards, damage, read, check_files=False)

            out = {
                "index": batch,
                "features": {level: take(level) for level in levels},
                "image_id": take("image_id"),
                "crop": take("crop"),
                "scale": take("scale"),
                "boxes": [boxes[i] for i in batch],
                "labels": [labels[i] for i in batch],
            }
            self._raise_damage(split, damage)
            return out

        batches = [index[i : i + batch_size] for i in range(0, len(index), batch_size)]
        # Arguments are checked above, when iter_batches is called; reading starts on next().
        return _prefetched(load, batches) if prefetch else map(load, batches)

    def nbytes(self, split: str, levels: Iterable[str] | None = None) -> int:
        """Uncompressed bytes ``read_split(split, levels)`` returns (boxes of written shards only)."""
        n = self._check_split(split)
        levels = self._check_levels(levels)
        total = sum(2 * n * math.prod(self.levels[level]) for level in levels)
        total += n * (8 + 4 * 4 + 4 * 2)  # image_id, crop, scale
        damage: list[tuple[str, int, str]] = []
        counts = self._read_checked(split, "num_boxes", range(self.num_shards(split)), damage, check_files=False)
        self._raise_damage(split, damage)
        total += int(counts.sum()) * (4 * 4 + 8)  # boxes, labels
        return total


def _prefetched(load: Callable[[np.ndarray], dict[str, Any]], batches: list[np.ndarray]) -> Iterator[dict[str, Any]]:
    """``map(load, batches)`` that loads batch k+1 in a background thread while batch k is used."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-prefetch") as pool:
        pending: Future[dict[str, Any]] | None = pool.submit(load, batches[0]) if batches else None
        for k in range(len(batches)):
            assert pending is not None
            current = pending.result()
            pending = pool.submit(load, batches[k + 1]) if k + 1 < len(batches) else None
            yield current


def materialise(
    store: FeatureStore,
    split: str,
    compute: Callable[[int, int], Mapping[str, Any]],
    *,
    shards: Iterable[int] | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> list[int]:
    """Compute and write every pending shard of ``split`` (or the pending ones of ``shards``).

    Done shards are skipped, so calling this again after a crash resumes where it stopped,
    and several processes can each take a disjoint subset of shards. Shards that a read
    found damaged (:class:`DamagedShard`) are not done any more, so this recomputes them.

    Args:
        compute: ``compute(start, stop)`` -> dict with ``write_shard``'s keyword arguments
            (features, image_id, crop, scale, boxes, labels) for samples ``[start, stop)``.
        shards: shard indices to consider (default all of the split).
        on_shard: called with the shard index after each shard is written (progress, logs).

    Returns:
        The shards written, ascending.
    """
    todo = range(store.num_shards(split)) if shards is None else sorted({int(s) for s in shards})
    for shard in todo:
        store.shard_range(split, shard)  # range check before any work
    try:
        done = store.done(split)
    except DamagedShard:  # unreadable flags are rewritten as not done: recompute those shards
        done = store.done(split)
    written: list[int] = []
    for shard in todo:
        if done[shard]:
            continue
        start, stop = store.shard_range(split, shard)
        result = compute(start, stop)
        if not isinstance(result, Mapping) or set(result) != set(_SAMPLE_FIELDS):
            got = sorted(result) if isinstance(result, Mapping) else type(result).__name__
            raise ValueError(f"compute({start}, {stop}) for split {split!r} shard {shard}: must return keys {list(_SAMPLE_FIELDS)}, got {got}")
        store.write_shard(split, shard, **result)
        written.append(shard)
        if on_shard is not None:
            on_shard(shard)
    return written
