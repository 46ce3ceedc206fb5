"""Dask worker preload of tests/test_cluster_faults.py (``dask worker --preload``).

The search's evaluation runs as in the product (``flows.search.evaluate_decoder``:
epoch checks, the row check, the part file, the audit line), but the proxy training it
calls trains the real decoder for one epoch on tiny random features instead of a
materialised feature store, and takes ``NASFCOS_TEST_EVAL_S`` seconds at least (so a test
can kill a worker mid-evaluation; ``<run>/hold_s`` sets it for one run), checking for a
cancel every 50 ms as the real training does at each batch. Each start is a line in
``<run>/starts.log``: when and where each arch's evaluation began (the re-dispatch figure
of a killed worker); each evaluation stopped by a cancel a line in ``<run>/stops.log``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

import flows.search as search
from nasfcos import cancel
from nasfcos.arch import resolve
from nasfcos.engine import proxy

_SPLITS: list = []


def _splits():
    if not _SPLITS:
        g = torch.Generator().manual_seed(0)
        feats = {k: torch.randn(4, c, s, s, generator=g) for k, c, s in (("C2", 4, 16), ("C3", 8, 8), ("C4", 8, 4), ("C5", 8, 2))}
        boxes, labels = [np.array([[4.0, 4.0, 40.0, 40.0]], dtype=np.float32)] * 4, [np.array([1])] * 4
        s = proxy.prepare_split(feats, boxes, labels, num_classes=2)
        _SPLITS.extend([s, s])
    return _SPLITS


def proxy_record(cfg, run, arch: str, *, epochs=None, resume=None, keep_state=None, alone: bool = False) -> dict:
    with open(run.root / "starts.log", "a") as f:
        f.write(f"{time.time():.3f} {resolve(arch).arch_id} pid={os.getpid()}\n")
    t0 = time.monotonic()
    torch.set_num_threads(1)
    try:
        record = proxy.evaluate_arch(arch, *_splits(), num_classes=2, cfg=proxy.ProxyConfig(epochs=1, batch_size=4), device_shared=not alone)
        hold = run.root / "hold_s"  # a test's longer evaluations, in this run only
        until = t0 + float(hold.read_text() if hold.exists() else os.environ.get("NASFCOS_TEST_EVAL_S", "1.5"))
        while time.monotonic() < until:  # the rest of the training, checking for a cancel at each "batch" as it does
            cancel.check()
            time.sleep(0.05)
    except cancel.Cancelled:  # in the training's own check or in the hold's
        with open(run.root / "stops.log", "a") as f:
            f.write(f"{time.time():.3f} {resolve(arch).arch_id} pid={os.getpid()}\n")
        raise
    return record


search.proxy_record = proxy_record
