"""Shared fixtures: small synthetic datasets written once per session."""

import os

import pytest
import torch

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """24 train / 8 val images of 64-96 px with 3 shape classes (VOC tree + COCO json)."""
    from nasfcos.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic_small")
    return make_synthetic(root, num_train=24, num_val=8, image_size=(64, 96), seed=0)
