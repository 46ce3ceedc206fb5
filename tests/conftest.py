"""Shared fixtures: small synthetic datasets and one Prefect test server per session."""

import os

import pytest
import torch

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _environment_as_it_was():
    """Each test leaves os.environ as it found it. A Dask nanny started in this process sets
    OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, PYTHONHASHSEED, ... here for good (to pass them to
    its workers); a later test's pipeline processes then ran with one thread in a fresh
    interpreter and two when forked from a server started before: the kill matrix's bits
    differed whenever loadfile put a local Dask cluster's test before it on one worker."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """24 train / 8 val images of 64-96 px with 3 shape classes (VOC tree + COCO json)."""
    from nasfcos.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic_small")
    return make_synthetic(root, num_train=24, num_val=8, image_size=(64, 96), seed=0)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One Prefect test server for every flow test of the session, with its own home."""
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(home / "storage")
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
