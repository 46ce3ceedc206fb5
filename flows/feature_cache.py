"""The proxy features of a run, loaded once per process and device: every device slot of
this process (search evaluations, the baselines' proxy rewards in train-full) trains on
the same copy, on the device or pinned in host memory to be streamed
(``execution.feature_residency``), read from the shared store or this machine's staged
copy of it (``execution.stage_features``)."""

from __future__ import annotations

import threading

from flows.placement import run_logger

Key = tuple[str, str, float | None, str, str | None]  # (feature store, device, size_range_scale, residency, staging dir)
_CACHE: dict[Key, tuple] = {}
_LOADING: dict[Key, threading.Lock] = {}  # one lock per key: a load never waits for another device's
_CACHE_LOCK = threading.Lock()


def _load_splits(key: Key) -> tuple:
    """(meta_train, meta_val, num_classes): both proxy splits read from the store (or this
    machine's staged copy of it) onto ``device``, or into host memory to be streamed.
    A damaged staged copy is dropped and the shared store read instead (which repairs
    nothing if it is sound, and names its own damage if not)."""
    import shutil

    from storage.features import DamagedShard
    from storage.staging import stage_store

    features, device, size_range_scale, residency, stage_dir = key
    if not stage_dir:
        return _read_splits(features, device, size_range_scale, residency)
    local = stage_store(features, stage_dir)
    try:
        return _read_splits(str(local), device, size_range_scale, residency)
    except DamagedShard as e:
        run_logger().warning("staged copy %s is damaged (%s); removed, reading %s", local, e, features)
        shutil.rmtree(local, ignore_errors=True)
        return _read_splits(features, device, size_range_scale, residency)


def _read_splits(path: str, device: str, size_range_scale: float | None, residency: str) -> tuple:
    import torch

    from nasfcos.engine.proxy import LEVELS, prepare_split, stream_features
    from storage.features import FeatureStore

    store = FeatureStore.open(path)
    k = int(store.attrs["num_classes"])
    splits = ("meta_train", "meta_val")
    stream = stream_features(sum(store.nbytes(s, LEVELS) for s in splits), device, residency)
    out = []
    for split in splits:
        d = store.read_split(split, levels=list(LEVELS))
        feats = {lv: torch.from_numpy(d["features"][lv]) for lv in LEVELS}
        out.append(prepare_split(feats, d["boxes"], d["labels"], num_classes=k, device=device, size_range_scale=size_range_scale, stream=stream))
    return (*out, k)


def splits(key: Key) -> tuple:
    """Both proxy splits for one device, loaded once per process and device: the
    slots of one device share this copy, and a slot that starts while another is
    loading it waits for that load instead of loading a second copy."""
    with _CACHE_LOCK:
        lock = _LOADING.setdefault(key, threading.Lock())
    with lock:
        if key not in _CACHE:
            _CACHE[key] = _load_splits(key)
        return _CACHE[key]


def free() -> None:
    """Drop every cached split (and CUDA's cached blocks): a stage that trains full
    detectors next needs the memory."""
    import torch

    with _CACHE_LOCK:
        _CACHE.clear()
        _LOADING.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
