"""Checkpoints: written atomically (``atomicio``) and read back with one-line errors. They
hold no RNG state: every random stream is a function of (seed, position) (``nasfcos.rng``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

import atomicio
from nasfcos.model.detector import Detector, DetectorSpec, build_detector
from nasfcos.rng import local_generator

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(obj: dict, path: Path) -> None:
    """``torch.save`` through a temp file and a rename: a crash leaves the previous
    checkpoint intact, never a truncated one."""
    atomicio.write_with(path, lambda f: torch.save(obj, f))


def remove_orphans(path: Path) -> None:
    """Delete temp files of ``path`` left by a process killed inside :func:`save_checkpoint`
    (the one writer of a checkpoint calls this before it starts writing again)."""
    atomicio.remove_orphans(path.parent, name=path.name, older_than=0)


def load_checkpoint(path: str | Path) -> dict:
    """Read a nasfcos checkpoint; a missing or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise ValueError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "spec" not in ckpt:
        raise ValueError(f"{path}: not a nasfcos checkpoint (needs 'model' and 'spec')")
    return ckpt


def weights_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint's weights (names, dtypes, shapes, bytes): what computed
    features depend on. Not of the file: pickle's bytes follow object identity, so a
    resumed training writes the same weights into other bytes than an uninterrupted one."""
    h = hashlib.sha256()
    for name, t in sorted(load_checkpoint(path)["model"].items()):
        t = t.detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file given as itself or as the training folder holding it (``runs/<id>/full/<arch_id>``)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no nasfcos checkpoint there (train-full writes runs/<id>/full/<arch_id>/{CHECKPOINT})")
    return path


def detector_from_checkpoint(path: str | Path) -> tuple[Detector, dict]:
    """Rebuild the detector stored in a checkpoint and load its weights."""
    ckpt = load_checkpoint(path)
    with local_generator(torch.Generator()):  # every weight is loaded next: its init needs no stream of the process's
        model = build_detector(DetectorSpec(**ckpt["spec"]))
    model.load_state_dict(ckpt["model"])
    return model, ckpt
