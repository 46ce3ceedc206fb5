"""Checkpoints: written atomically (``atomicio``), read back with one-line errors, and the
RNG states that make a resumed run continue exactly where it stopped."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

import atomicio
from nasfcos.model.detector import Detector, DetectorSpec, build_detector

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(obj: dict, path: Path) -> None:
    """``torch.save`` through a temp file and a rename: a crash leaves the previous
    checkpoint intact, never a truncated one."""
    atomicio.write_with(path, lambda f: torch.save(obj, f))


def remove_orphans(path: Path) -> None:
    """Delete temp files of ``path`` left by a process killed inside :func:`save_checkpoint`
    (the one writer of a checkpoint calls this before it starts writing again)."""
    atomicio.remove_orphans(path.parent, name=path.name, older_than=0)


def rng_state() -> dict:
    # numpy's state as tensor + plain values so the file loads with weights_only=True
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def detector_from_checkpoint(path: str | Path) -> tuple[Detector, dict]:
    """Rebuild the detector stored in a checkpoint and load its weights."""
    ckpt = load_checkpoint(path)
    model = build_detector(DetectorSpec(**ckpt["spec"]))
    model.load_state_dict(ckpt["model"])
    return model, ckpt
