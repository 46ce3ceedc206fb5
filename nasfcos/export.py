"""A trained detector as a self-contained folder (issue #30, item 3): what a user takes away
from a run, loadable without the run directory or pickle.

    nasfcos export --checkpoint runs/demo/full/4783218e29f8 --out exported/
    nasfcos.load("exported/")  ·  nasfcos predict --checkpoint exported/ --images photos/

The folder holds ``model.safetensors`` (the weights) and ``config.json``: ``format_version``,
the detector's spec (backbone, decoder arch string, widths), the classes with their
dataset ids, the test-time input size and the post-processing settings (score threshold,
NMS). A folder of an older ``format_version`` keeps loading (a committed one is tested).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import atomicio
from nasfcos.engine.checkpoint import checkpoint_path, detector_from_checkpoint
from nasfcos.model.detector import Detector, DetectorSpec, build_detector
from nasfcos.rng import local_generator

FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir/{model.safetensors, config.json}`` from a nasfcos checkpoint (or the folder holding it)."""
    from safetensors.torch import save_file

    checkpoint = checkpoint_path(checkpoint)
    model, ckpt = detector_from_checkpoint(checkpoint)
    meta = ckpt.get("meta") or {}
    fcos = model.fcos
    config = {
        "format_version": FORMAT_VERSION,
        "nasfcos_version": _version(),
        "spec": ckpt["spec"],
        "classes": list(meta.get("classes") or [str(k) for k in range(fcos.num_classes)]),
        "category_ids": list(meta.get("category_ids") or range(fcos.num_classes)),
        "input": {"min_size": meta.get("eval_min_size", 800), "max_size": meta.get("eval_max_size", 1333), "mean": "imagenet", "std": "imagenet"},
        "postprocess": {"score_thresh": fcos.score_thresh, "pre_nms_top_n": fcos.pre_nms_top_n, "nms_thresh": fcos.nms_thresh, "max_detections": fcos.max_detections},
        "trained": {"iteration": int(ckpt.get("iteration", -1)), "losses": ckpt.get("losses", {}), "from": str(checkpoint)},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # clones: safetensors refuses tensors that share storage (a decoder's shared head layers)
    tmp = out / f".{WEIGHTS}.tmp"
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
    tmp.chmod(0o644)  # readable by the team, as every other file of a run
    tmp.replace(out / WEIGHTS)
    atomicio.write_json(out / CONFIG, config)
    return out


def load_exported(folder: str | Path) -> tuple[Detector, dict]:
    """(detector, config) of an exported folder; a missing or foreign folder is one line."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {CONFIG} (not a folder `nasfcos export` wrote)") from None
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG}: format_version {version!r} is not one this nasfcos reads (<= {FORMAT_VERSION}); upgrade nasfcos")
    with local_generator(torch.Generator()):  # every weight is loaded next
        model = build_detector(DetectorSpec(**config["spec"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model, config


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nasfcos")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "unknown"
