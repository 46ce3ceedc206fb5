"""A trained detector as a self-contained folder (issue #30, item 3): what a user takes away
from a run, loadable without the run directory or pickle.

    nasfcos export --checkpoint runs/demo/full/4783218e29f8 --out exported/ [--onnx]
    nasfcos.load("exported/")  ·  nasfcos predict --model exported/ --images photos/

The folder holds ``model.safetensors`` (the weights), ``config.json`` (``format_version``, the
detector's spec: backbone, decoder arch string, widths; the classes with their dataset ids,
the test-time input size, the post-processing settings: score threshold, NMS; with
``--onnx`` the graph's opset, exporter and outputs), ``MODEL.md`` (the evaluate stage's card
of the arch when the checkpoint's folder has one, else one made from the checkpoint) and,
with ``--onnx``, ``model.onnx`` (``nasfcos/onnx_export.py``). A folder of an older
``format_version`` keeps loading (a committed one is tested).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import atomicio
from nasfcos.engine.checkpoint import checkpoint_path, detector_from_checkpoint
from nasfcos.model.detector import Detector, DetectorSpec, build_detector
from nasfcos.onnx_export import ONNX_FILE, OnnxExportError, export_onnx
from nasfcos.rng import local_generator

FORMAT_VERSION = 1
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "MODEL.md"


def export(checkpoint: str | Path, out_dir: str | Path, *, onnx: bool = False) -> Path:
    """Write ``out_dir/{model.safetensors, config.json, MODEL.md}`` (and ``model.onnx`` with
    ``onnx``) from a nasfcos checkpoint (or the folder holding it)."""
    from safetensors.torch import save_file

    checkpoint = checkpoint_path(checkpoint)
    model, ckpt = detector_from_checkpoint(checkpoint)
    config = {
        "format_version": FORMAT_VERSION,
        "nasfcos_version": _version(),
        **detector_config(model, ckpt),
        "trained": {"iteration": int(ckpt.get("iteration", -1)), "losses": ckpt.get("losses", {}), "from": str(checkpoint)},
    }
    out = Path(out_dir)
    if out.resolve() == checkpoint.parent.resolve() or (out / "checkpoint.pt").exists():
        raise ValueError(f"--out {out}: a training folder (it holds checkpoint.pt); export into a folder of its own")
    out.mkdir(parents=True, exist_ok=True)
    # config.json goes first and comes back last: a folder whose export was cut short has none,
    # and load says so, instead of an earlier export's spec beside these weights
    (out / CONFIG).unlink(missing_ok=True)
    # clones: safetensors refuses tensors that share storage (a decoder's shared head layers)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    atomicio.write_via_path(out / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format_version": str(FORMAT_VERSION)}))
    (out / ONNX_FILE).unlink(missing_ok=True)  # a graph of an earlier export would not match these weights
    refused = None
    if onnx:
        try:
            config["onnx"] = export_onnx(model.eval(), out / ONNX_FILE, arch=config["spec"]["decoder"])
        except OnnxExportError as e:  # the rest of the folder is written and usable; then the one line
            refused = e
    atomicio.write_json(out / CONFIG, config)
    atomicio.write_text(out / CARD, _card(checkpoint, config))
    drawn = checkpoint.parent / "detections.jpg"  # the evaluate stage's picture, which its card shows
    if (checkpoint.parent / CARD).is_file() and drawn.is_file():
        atomicio.write_bytes(out / drawn.name, drawn.read_bytes())
    else:  # an earlier export's into this folder
        (out / drawn.name).unlink(missing_ok=True)
    if refused is not None:
        raise refused
    return out


def detector_config(model: Detector, ckpt: dict) -> dict:
    """What a checkpoint's detector needs beside its weights to run on images (``config.json``'s
    fields, and what ``nasfcos.load`` reads of a checkpoint): its spec, the classes with their
    dataset ids, the test-time input size, the post-processing settings."""
    meta = ckpt.get("meta") or {}
    fcos = model.fcos
    return {
        "spec": ckpt["spec"],
        "classes": list(meta.get("classes") or [str(k) for k in range(fcos.num_classes)]),
        "category_ids": list(meta.get("category_ids") or range(fcos.num_classes)),
        "input": {"min_size": meta.get("eval_min_size", 800), "max_size": meta.get("eval_max_size", 1333), "mean": "imagenet", "std": "imagenet"},
        "postprocess": {"score_thresh": fcos.score_thresh, "pre_nms_top_n": fcos.pre_nms_top_n, "nms_thresh": fcos.nms_thresh, "max_detections": fcos.max_detections},
    }


def _card(checkpoint: Path, config: dict) -> str:
    """The evaluate stage's MODEL.md of this arch (``full/<arch_id>/MODEL.md``, but its "How to
    load it") when there is one, else the facts the checkpoint holds; then what this folder
    holds and how to run it."""
    source = checkpoint.parent / CARD
    if source.is_file():  # its "How to load it" names the run's folder: this folder's follows
        text = source.read_text().split("\n## How to load it", 1)[0].rstrip() + "\n"
    else:
        spec = config["spec"]
        widths = f"width {spec['width']}" + (f", head width {spec['head_width']}" if spec.get("head_width") else "")
        text = "\n".join(
            [
                f"# An FCOS detector with a NAS-FCOS decoder ({spec['decoder']})",
                "",
                f"- Decoder: `{spec['decoder']}`; backbone `{spec['backbone']}`; {widths}",
                f"- Classes ({len(config['classes'])}): {', '.join(config['classes'])}",
                f"- Trained {config['trained']['iteration']} iterations; last losses {config['trained']['losses']}",
                "",
            ]
        )
    size, post = config["input"], config["postprocess"]
    lines = [
        "",
        "## This folder (`nasfcos export`)",
        "",
        f"- `{WEIGHTS}` (weights), `{CONFIG}` (format_version {config['format_version']}, nasfcos {config['nasfcos_version']})",
        f"- Input: short side {size['min_size']}, long side <= {size['max_size']}, ImageNet mean/std; score >= {post['score_thresh']}, "
        f"top {post['pre_nms_top_n']} per level, class-wise NMS at IoU {post['nms_thresh']}, {post['max_detections']} detections an image",
    ]
    if "onnx" in config:
        o = config["onnx"]
        lines.append(
            f"- `{o['file']}`: the network (images to each level's raw outputs), opset {o['opset']}, {o['exporter']}; NMS is not in the graph "
            f'(`nasfcos.load(folder, runtime="onnx")` runs it in onnxruntime with nasfcos\'s post-processing); checked in onnxruntime '
            f"{o['checked']['onnxruntime']}: max |diff| {o['checked']['max_abs_diff']:.2g} from PyTorch"
        )
    lines += ["", "```python", "import nasfcos", 'detect = nasfcos.load("path/to/this/folder")', "found = detect(images)  # PIL images or (3, H, W) tensors of any size", "```"]
    lines += ["", "`nasfcos predict --model <this folder> --images <files, folder or COCO json> --draw drawn/`"]
    return text + "\n".join(lines) + "\n"


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
