"""Training curves as TensorBoard event files: a training of hours shows its loss terms,
learning rate, speed and AP while it runs (``tensorboard --logdir runs/<id>``), and the
pipeline's train-full summary draws every arch's loss from the same files
(``storage.curves`` reads them).

Rank 0 writes ``<out>/tb/``. A resumed training starts its writer with ``purge_step`` just
after the checkpoint's iteration: TensorBoard then drops the points the killed attempt
logged after that checkpoint, so the curve has one value per step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

TB = "tb"  # under a training's output directory


class Curves:
    """Scalars of one training (rank 0's); inert when tensorboard is not installed (a
    warning says so: training never fails for its curves)."""

    def __init__(self, out_dir: str | Path, *, start: int = 0, enabled: bool = True) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out_dir) / TB), purge_step=start + 1 if start else None, flush_secs=30)
        except Exception as e:  # noqa: BLE001 - e.g. a GPU box with torch only, a protobuf mismatch, a full disk
            log.warning("no training curves in %s: %s: %s (pip install tensorboard)", Path(out_dir) / TB, type(e).__name__, e)

    def add(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, float(value), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "Curves":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def add_scalars(out_dir: str | Path, step: int, scalars: Mapping[str, float]) -> None:
    """Append ``scalars`` at ``step`` to a training's curves (e.g. its AP, after evaluation)."""
    with Curves(out_dir) as c:
        c.add(step, scalars)
