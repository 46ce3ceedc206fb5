"""``rungs/``: the proxy training states successive halving resumes promoted archs from.

One file per (arch, rung): ``run_dir/rungs/<arch_id>-<epochs>.state``, the bytes of
``nasfcos.search.halving.pack_state`` (decoder, EMA, Adam, data-order generator after
``epochs`` proxy epochs), written atomically (temp file, fsync, rename) *before* the
evaluation's row, so a row of rung r means its state is on disk for rung r+1. The
evaluation of rung r+1 drops the state of rung r once its own row is written, and the
search stage drops what is left when it finishes (archs never promoted); a kill
in between leaves a state nobody reads, removed by those same steps later.

Size: four fp32 copies of the decoder's weights (weights, EMA, two Adam moments): ~20 MB
for the mean random decoder of the paper's proxy (1.3 M parameters; 5-95 %: 0.6-2.3 M).
An arch that is never promoted keeps its first-rung state until the search ends, so a
search of N archs with eta 3 holds up to ~2/3 N of them (2,800 archs: ~37 GB). An arch
ranked below N/eta in its rung can never be promoted (its rank only falls as archs
arrive), so dropping those would halve that; not done yet.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import atomicio

_ID = re.compile(r"[0-9a-f]{12}")


class RungStates:
    """The training states of one run's successive halving."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir) / "rungs"

    def path(self, arch_id: str, epochs: int) -> Path:
        if not _ID.fullmatch(arch_id) or int(epochs) < 1:
            raise ValueError(f"rung state: bad arch id {arch_id!r} or epochs {epochs!r}")
        return self.dir / f"{arch_id}-{int(epochs)}.state"

    def write(self, arch_id: str, epochs: int, data: bytes) -> Path:
        path = self.path(arch_id, epochs)
        atomicio.write_bytes(path, data)
        return path

    def read(self, arch_id: str, epochs: int) -> bytes | None:
        """The state's bytes, or None when there is none (never kept, or dropped)."""
        try:
            return self.path(arch_id, epochs).read_bytes()
        except FileNotFoundError:
            return None

    def drop(self, arch_id: str, epochs: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(arch_id, epochs))
        atomicio.remove_orphans(self.dir)  # a young temp file may be another writer's

    def clear(self) -> None:
        """Drop every state (the search is over: nothing will be promoted again)."""
        shutil.rmtree(self.dir, ignore_errors=True)
