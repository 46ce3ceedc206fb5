"""The report's tables (``flows/report/page.py``): the leaderboard against the baseline or
the best archs so far, the top-k, the archs not ok, the stages and their timings, the config;
each as the same text in report.md and report.html."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

import numpy as np
import pandas as pd

from flows.report import plots
from flows.report.run_data import RunData
from storage.run_dir import STAGES


def fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s / 86400:.1f} days"


def _cell(v: Any) -> str:
    """One table cell; the same text in report.md and report.html."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4f}"
    if isinstance(v, (pd.Timestamp, datetime)):
        return f"{v:%Y-%m-%d %H:%M:%S}"
    return str(v)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""

    @classmethod
    def of(cls, title: str, df: pd.DataFrame, columns: Sequence[str], note: str = "") -> "Table":
        cols = [c for c in columns if c in df.columns]
        return cls(title, cols, [[_cell(v) for v in r] for r in df[cols].itertuples(index=False)], note)

    def markdown(self) -> str:
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        lines = [f"## {self.title}", ""] + ([self.note, ""] if self.note else [])
        if not self.rows:
            return "\n".join(lines if self.note else lines + ["(none yet)"])
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        e = html_text
        out = [f"<h2>{e(self.title)}</h2>"] + ([f"<p>{e(self.note)}</p>"] if self.note else [])
        if not self.rows:
            return "\n".join(out if self.note else out + ["<p>(none yet)</p>"])
        out.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in self.columns) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in self.rows]
        return "\n".join(out + ["</table>"])


def html_text(s: str) -> str:
    """HTML text (not attribute) content: quotes stay as they are."""
    return html.escape(s, quote=False)


def _short(v: Any, n: int = 70) -> str:
    s = json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def stage_table(data: RunData) -> Table:
    rows = []
    for stage in STAGES:
        m, started = data.manifests.get(stage), data.started.get(stage)
        finished = pd.Timestamp(m["finished_at"]).to_pydatetime() if m and m.get("finished_at") else None
        if started and finished and started > finished:  # a copied run dir: the claim's mtime is the copy's
            started = None
        state = "finished" if m else ("started, not finished" if started else "not started")
        span = fmt_duration((finished - started).total_seconds()) if finished and started and finished >= started else "–"
        outputs = "; ".join(f"{k}: {len(v)} entries" if isinstance(v, (list, dict)) else f"{k}: {_short(v, 40)}" for k, v in (m or {}).get("outputs", {}).items())
        rows.append([stage, state, _cell(started), _cell(finished), span, outputs or "–"])
    note = ("started = when the stage first claimed the run directory (its manifests/<stage>.claim.json); "
            "span = finished - started, resumes and extensions included; times UTC.")  # fmt: skip
    return Table("Stages", ["stage", "state", "started", "finished", "span", "outputs"], rows, note)


def config_table(data: RunData) -> Table:
    c = data.config
    if not c:
        return Table("Config", ["field", "value"], [], "No report/config.json yet: the stages write it when they redraw the report.")
    rows = [["run_id", str(c.get("run_id"))], ["runs_dir", str(c.get("runs_dir"))]]
    for section, values in c.items():
        if isinstance(values, dict):
            rows += [[f"{section}.{k}", _short(v)] for k, v in values.items() if not isinstance(v, dict)]
    return Table("Config", ["field", "value"], rows, "As the stages last ran it (report/config.json).")


def tables(data: RunData) -> dict[str, Table]:
    """The report's tables by role: ``result`` (the leaderboard against the baseline, or the
    best archs while there is none), ``top_k``, ``failed``, ``stages``, ``config``."""
    res = data.results
    out: dict[str, Table] = {}
    if data.board is not None:
        board = data.board.assign(kind=plots.board_kind(data.board))
        cols = ["kind", "arch_id", "proxy_reward", "AP", "AP50", "AP75", "APs", "APm", "APl", "params", "macs", "status", "error", "arch"]
        note = "COCO AP on val after full training; the baseline is trained with the same budget. -1: no objects of that size."
        if (d := plots.reward_vs_ap(data.board)) is not None:
            note += f" Kendall's tau of proxy reward against AP: {_cell(d[1])} over {d[2]} archs."
        out["result"] = Table.of("Leaderboard (leaderboard.parquet)", board, cols, note)
    if data.top_k is not None:
        out["top_k"] = Table.of(f"Top {len(data.top_k)} by proxy reward (top_k.parquet)", data.top_k, ["rank", "arch_id", "reward", "params", "macs", "n_deform_fpn", "arch"])
    elif len(res):
        ok = res[res["status"] == "ok"].sort_values(["reward", "arch_id"], ascending=[False, True]).head(10)
        out["top_k"] = Table.of("Best 10 so far (results, not yet selected)", ok, ["arch_id", "step", "reward", "params", "macs", "n_deform_fpn", "arch"])
    if "result" not in out and "top_k" in out:  # no leaderboard yet: the best archs lead
        out["result"] = out.pop("top_k")
    failed = res[res["status"] != "ok"] if len(res) else res
    if len(failed):
        out["failed"] = Table.of(f"Archs not ok ({len(failed)}; last 10)", failed.tail(10), ["arch_id", "step", "status", "error"])
    out["stages"] = stage_table(data)
    out["config"] = config_table(data)
    return out


def best_searched(board: pd.DataFrame | None) -> pd.Series | None:
    """The leaderboard row of the searched arch with the best AP; None while there is none."""
    if board is None or not len(board) or "AP" not in board.columns:
        return None
    ok = board[pd.to_numeric(board["AP"], errors="coerce").notna() & (plots.board_kind(board) == "searched")]
    return None if ok.empty else ok.sort_values("AP", ascending=False).iloc[0]
