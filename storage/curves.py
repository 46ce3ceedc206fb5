"""The training curves of a run directory (``full/<arch_id>/tb/``, ``backbone/tb/``: TensorBoard
event files its trainings write, ``nasfcos.engine.curves``), read for the report's and the
train-full summary's loss plot."""

from __future__ import annotations

import logging
from pathlib import Path

TB = "tb"  # under a training's output directory (nasfcos.engine.curves.TB)


def read_curves(out_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] of a training's curves, as TensorBoard shows them (purged
    points left out); {} when there are none (or no tensorboard to read them)."""
    tb = Path(out_dir) / TB
    if not tb.is_dir():
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its warning on every purge (a resumed training) is expected
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
