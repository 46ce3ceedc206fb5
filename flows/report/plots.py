"""The pictures of a run, drawn from DataFrames (no file or Prefect access here).

Each function takes the tables of ``results.parquet`` / ``top_k.parquet`` /
``leaderboard.parquet`` (as pandas reads them) and returns a matplotlib
:class:`~matplotlib.figure.Figure`, or ``None`` when its data does not exist yet
(no AP before ``evaluate``). Figures are drawn on the Agg canvas, never on a display,
and without pyplot's global state, so several threads may draw at once.
:func:`png` turns one into the small PNG that report files and Prefect artifacts hold.

- :func:`reward_curve`: every sampled arch's reward in sampling order, the running best
  and the per-step mean (the shape of the paper's Fig. 8), one colour per policy;
- :func:`choice_frequencies`: how often each op / aggregation / input was chosen per FPN
  block and head position, first half of the search against the second;
- :func:`reward_vs_complexity`: proxy reward against MACs and parameters, Pareto front marked;
- :func:`reward_vs_ap`: proxy reward against full-training AP, Kendall's tau;
- :func:`arch_drawing`: one decoder (C2-C5 pool, the FPN blocks, P3-P7, the head layers).
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

from nasfcos.arch import AGGS, FPN_OPS, HEAD_OPS, NUM_BACKBONE_INPUTS, NUM_FPN_BLOCKS, Arch

DPI = 80  # a plot is a few tens of KB: artifacts live in Prefect's database
SHORT = {  # op names as drawn
    "sep_conv_3x3": "sep3", "sep_conv_3x3_dil3": "sep3d3", "sep_conv_5x5_dil6": "sep5d6", "skip_connect": "skip",
    "def_conv_3x3": "def3", "conv1x1": "1x1", "conv3x3": "3x3",
}  # fmt: skip
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def png(fig: Figure, *, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (Agg canvas, paletted where that is smaller)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    data = buf.getvalue()
    try:  # 8-bit palette: these plots have few colours; about a third of the bytes
        from PIL import Image

        small = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=128).save(small, format="PNG", optimize=True)
        return small.getvalue() if small.tell() < len(data) else data
    except Exception:  # noqa: BLE001 - the full-colour PNG is as good, only bigger
        return data


def sampling_order(results: pd.DataFrame) -> pd.DataFrame:
    """Rows in the order the controller drew them (step, then sample within the step)."""
    return results.sort_values(["step", "sample", "arch_id"], kind="stable").reset_index(drop=True)


def _ok(results: pd.DataFrame) -> pd.Series:
    return (results["status"] == "ok") & np.isfinite(results["reward"].astype(float))


# ------------------------------------------------------------------ reward curve


REWARD_LABELS = {"loss": "proxy reward (neg. val loss)", "ap": "proxy reward (meta-val AP)"}


def reward_curve(runs: Mapping[str, pd.DataFrame], reward: str = "loss") -> Figure | None:
    """Reward of every sampled arch in sampling order, with the running best and the
    per-step mean, one colour per entry of ``runs`` (e.g. ``{"ppo": df, "random": df2}``).
    Archs without a reward (failed, over budget) are crosses on the bottom edge (their
    penalty would squash the axis). ``reward``: what the reward is (``search.reward``)."""
    runs = {k: sampling_order(v) for k, v in runs.items() if len(v)}
    if not runs or not any(_ok(df).any() for df in runs.values()):
        return None
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    ok_rewards = np.concatenate([df.loc[_ok(df), "reward"].to_numpy(float) for df in runs.values()])
    lo, hi = float(ok_rewards.min()), float(ok_rewards.max())
    pad = 0.05 * (hi - lo or 1.0)
    for (label, df), colour in zip(runs.items(), itertools.cycle(_COLOURS)):  # more runs than colours: reused, none dropped
        x = np.arange(len(df))
        ok = _ok(df).to_numpy()
        r = df["reward"].to_numpy(float)
        ax.scatter(x[ok], r[ok], s=10, alpha=0.45, color=colour, label=f"{label}: each arch ({int(ok.sum())})")
        status = df["status"].astype(str).to_numpy()
        for st in sorted(set(status[~ok])):  # failed, or e.g. over_budget: no reward to place
            sel = ~ok & (status == st)
            ax.scatter(x[sel], np.full(sel.sum(), lo - pad), marker="x", s=18, color="tab:red" if st == "failed" else "0.4", label=f"{label}: {st} ({int(sel.sum())})")
        best = pd.Series(np.where(ok, r, np.nan)).cummax().ffill().to_numpy()
        ax.step(x, best, where="post", color=colour, lw=2, label=f"{label}: best so far ({np.nanmax(best):.4f})")
        per_step = pd.DataFrame({"x": x, "r": np.where(ok, r, np.nan), "step": df["step"].to_numpy()}).groupby("step").agg(x=("x", "mean"), r=("r", "mean"))
        ax.plot(per_step["x"], per_step["r"], "o--", ms=3, lw=1, color=colour, alpha=0.9, label=f"{label}: step mean")
    ax.set_ylim(lo - 2 * pad, hi + 2 * pad)
    ax.set_xlabel("sampled architecture (sampling order)")
    ax.set_ylabel(REWARD_LABELS.get(reward, f"proxy reward ({reward})"))
    ax.set_title("Search: reward of every sampled architecture")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def loss_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]) -> Figure | None:
    """Total training loss against iteration of each training in ``curves`` (label ->
    ``storage.curves.read_curves``), its COCO val AP in the legend once evaluated; None
    before any training logged a loss."""
    drawn = {k: c for k, c in curves.items() if c.get("loss/total")}
    if not drawn:
        return None
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    for (label, c), colour in zip(sorted(drawn.items()), itertools.cycle(_COLOURS)):
        steps, values = zip(*c["loss/total"], strict=True)
        ap = f", AP {c['val/AP'][-1][1]:.3f}" if c.get("val/AP") else ""
        ax.plot(steps, values, lw=1.2, color=colour, label=f"{label} (iteration {steps[-1]}{ap})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (cls + reg + ctr)")
    ax.set_yscale("log")
    ax.set_title("Full training: loss of every arch (tensorboard --logdir for all curves)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------- choice frequencies


def _pool_names(blocks: int, kind: str) -> list[str]:
    """Names of the pool entries blocks read: C2-C5 and b<i> (FPN); p, o0 and each head block's two op outputs and aggregation (dag head)."""
    if kind == "fpn":
        return [f"C{i + 2}" for i in range(NUM_BACKBONE_INPUTS)] + [f"b{i}" for i in range(blocks)]
    return ["p", "o0"] + [n for t in range(blocks) for n in (f"h{t}.1", f"h{t}.2", f"h{t}")]


def _counts(lists: Sequence[Sequence], rows: int, per_row: int, cols: int, lookup: Mapping | None) -> np.ndarray:
    """(rows, cols) fractions: entry j of each list belongs to row j // per_row."""
    out = np.zeros((rows, cols))
    for items in lists:
        for j, v in enumerate(items):
            out[j // per_row, lookup[v] if lookup is not None else int(v)] += 1
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def choice_frequencies(results: pd.DataFrame) -> Figure | None:
    """How often each op, aggregation and input was chosen per FPN block and head position,
    in the first and the second half of the search (sampling order), as heatmaps.
    Only searched archs count (an ``fpn=fcos`` baseline has no choices)."""
    df = sampling_order(results)
    df = df[df["fpn_kind"] == "searched"].reset_index(drop=True)
    if len(df) < 2:
        return None
    halves = {"first half": df.iloc[: len(df) // 2], "second half": df.iloc[len(df) // 2 :]}
    head_kind = df["head_kind"].mode().iloc[0]
    panels = []  # (title, {half: matrix}, row labels, col labels, mask)
    blocks = [f"b{i}" for i in range(NUM_FPN_BLOCKS)]
    pool = _pool_names(NUM_FPN_BLOCKS, "fpn")
    invalid = np.array([[j >= NUM_BACKBONE_INPUTS + b for j in range(len(pool))] for b in range(NUM_FPN_BLOCKS)])
    panels.append(
        (
            "FPN op (op1 + op2)",
            {h: _counts(d["fpn_ops"], NUM_FPN_BLOCKS, 2, len(FPN_OPS), {o: i for i, o in enumerate(FPN_OPS)}) for h, d in halves.items()},
            blocks,
            [SHORT[o] for o in FPN_OPS],
            None,
        )
    )
    panels.append(
        ("FPN aggregation", {h: _counts(d["fpn_aggs"], NUM_FPN_BLOCKS, 1, len(AGGS), {a: i for i, a in enumerate(AGGS)}) for h, d in halves.items()}, blocks, list(AGGS), None)
    )
    panels.append(("FPN input (id1 + id2)", {h: _counts(d["fpn_inputs"], NUM_FPN_BLOCKS, 2, len(pool), None) for h, d in halves.items()}, blocks, pool, invalid))
    head = {h: d[d["head_kind"] == head_kind] for h, d in halves.items()}
    if head_kind in ("seq", "dag") and all(len(d) for d in head.values()):
        n_ops = len(head["first half"]["head_ops"].iloc[0])
        if head_kind == "seq":
            positions = [f"L{i}" for i in range(n_ops)]
        else:
            positions = ["o0"] + [f"h{t}.{k}" for t in range((n_ops - 1) // 2) for k in (1, 2)]
        lookup = {o: i for i, o in enumerate(HEAD_OPS)}
        panels.append(
            (f"head op ({head_kind})", {h: _counts(d["head_ops"], n_ops, 1, len(HEAD_OPS), lookup) for h, d in head.items()}, positions, [SHORT[o] for o in HEAD_OPS], None)
        )
        if head_kind == "dag":
            n_blocks = (n_ops - 1) // 2
            hb = [f"h{t}" for t in range(n_blocks)]
            hpool = _pool_names(n_blocks, "head")
            hinvalid = np.array([[j >= 2 + 3 * t for j in range(len(hpool))] for t in range(n_blocks)])
            panels.append(
                ("head aggregation", {h: _counts(d["head_aggs"], n_blocks, 1, len(AGGS), {a: i for i, a in enumerate(AGGS)}) for h, d in head.items()}, hb, list(AGGS), None)
            )
            panels.append(("head input (id1 + id2)", {h: _counts(d["head_inputs"], n_blocks, 2, len(hpool), None) for h, d in head.items()}, hb, hpool, hinvalid))
    fig = Figure(figsize=(10, 1.2 + 1.75 * len(panels)))
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for r, (title, mats, rows, cols, mask) in enumerate(panels):
        vmax = max(float(m.max()) for m in mats.values()) or 1.0
        for c, (half, m) in enumerate(mats.items()):
            ax = axes[r, c]
            shown = np.ma.masked_array(m, mask=mask) if mask is not None else m
            ax.imshow(shown, cmap="Blues", vmin=0, vmax=vmax, aspect="auto")
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    if mask is None or not mask[i, j]:
                        ax.text(j, i, f"{100 * m[i, j]:.0f}", ha="center", va="center", fontsize=6, color="white" if m[i, j] > 0.6 * vmax else "black")
            ax.set_xticks(range(len(cols)), cols, fontsize=7)
            ax.set_yticks(range(len(rows)), rows, fontsize=7)
            ax.set_title(f"{title}, {half} ({len(halves[half])} archs), %", fontsize=8)
    height = fig.get_figheight()  # fixed margins: tight_layout would draw these ~500 texts once more
    fig.suptitle("What the controller chose: % of choices per block / position", fontsize=10, y=1 - 0.12 / height)
    fig.subplots_adjust(left=0.05, right=0.99, top=1 - 0.75 / height, bottom=0.3 / height, hspace=0.55, wspace=0.1)
    return fig


# ---------------------------------------------------------- reward vs complexity


def pareto_front(cost: Sequence[float], reward: Sequence[float]) -> np.ndarray:
    """Indices of the points no other point beats on both (lower cost, higher reward),
    by increasing cost."""
    cost, reward = np.asarray(cost, float), np.asarray(reward, float)
    order = np.lexsort((-reward, cost))  # cost ascending, then reward descending
    front, best = [], -math.inf
    for i in order:
        if reward[i] > best:
            front.append(i)
            best = reward[i]
    return np.array(front, dtype=int)


def reward_vs_complexity(results: pd.DataFrame, *, top_k: Sequence[str] = (), trained: Sequence[str] = ()) -> Figure | None:
    """Proxy reward against decoder MACs and parameters (at the proxy width), the Pareto
    front marked; the selected top-k and the fully trained archs ringed when given."""
    df = results[_ok(results) & (results["macs"] > 0) & (results["params"] > 0)]
    if df.empty:
        return None
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    r = df["reward"].to_numpy(float)
    for ax, col, name in ((axes[0], "macs", "MACs"), (axes[1], "params", "parameters")):
        x = df[col].to_numpy(float)
        ax.scatter(x, r, s=12, alpha=0.5, color="tab:blue", label=f"searched ({len(df)})")
        front = pareto_front(x, r)
        ax.step(x[front], r[front], where="post", color="tab:red", lw=1.2)
        ax.scatter(x[front], r[front], s=28, color="tab:red", label=f"Pareto front ({len(front)})", zorder=3)
        for ids, marker, label, size in ((top_k, "o", "top-k", 70), (trained, "*", "fully trained", 160)):
            sel = df["arch_id"].isin(list(ids)).to_numpy()
            if sel.any():
                ax.scatter(x[sel], r[sel], s=size, marker=marker, facecolors="none", edgecolors="black", lw=1.2, label=f"{label} ({int(sel.sum())})", zorder=4)
        if x.max() > 10 * x.min():
            ax.set_xscale("log")
        ax.set_xlabel(f"decoder {name} (proxy width)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("proxy reward")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Proxy reward against complexity", fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------- reward vs AP


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences (ties in either count as neither
    concordant nor discordant; NaN when fewer than two pairs differ)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) != len(y):
        raise ValueError(f"kendall_tau: {len(x)} x values but {len(y)} y values")
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n0 = len(i)
    n1, n2 = int((dx == 0).sum()), int((dy == 0).sum())
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def board_kind(board: pd.DataFrame) -> pd.Series:
    """``searched`` or ``baseline`` per leaderboard row (no ``kind`` column: all searched)."""
    if "kind" not in board.columns:
        return pd.Series("searched", index=board.index)
    return board["kind"].fillna("searched").astype(str)


def reward_vs_ap(board: pd.DataFrame) -> tuple[Figure, float, int] | None:
    """Proxy reward against COCO AP of the fully trained archs and the baseline, with
    Kendall's tau over every row that has both (a baseline without a proxy reward is a
    horizontal line). Returns (figure, tau, pairs), or None before any AP exists."""
    status = board["status"] if "status" in board.columns else pd.Series("ok", index=board.index)  # older boards: no status
    ok = status.eq("ok") & np.isfinite(pd.to_numeric(board["AP"], errors="coerce").astype(float))
    df = board[ok].assign(_kind=board_kind(board)[ok])
    if df.empty:
        return None
    reward, ap = df["proxy_reward"].astype(float).to_numpy(), df["AP"].astype(float).to_numpy()
    both = np.isfinite(reward)
    tau = kendall_tau(reward[both], ap[both]) if both.sum() >= 2 else float("nan")
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    base = (df["_kind"] == "baseline").to_numpy()
    sel = both & ~base
    ax.scatter(reward[sel], ap[sel], s=40, color="tab:blue", label=f"searched ({int(sel.sum())})", zorder=3)
    sel_b = both & base
    if sel_b.any():
        ax.scatter(reward[sel_b], ap[sel_b], s=140, marker="*", color="tab:red", label="baseline", zorder=3)
    for k in np.flatnonzero(base & ~both):
        name = str(df["arch"].iloc[k]) if "arch" in df.columns else ""
        ax.axhline(ap[k], color="tab:red", ls="--", lw=1.2, label=f"baseline {name[:30]} (no proxy reward)")
    for k in np.flatnonzero(both):
        ax.annotate(str(df["arch_id"].iloc[k])[:6], (reward[k], ap[k]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    t = f"Kendall's tau {tau:.3f} over {int(both.sum())} archs" if math.isfinite(tau) else f"Kendall's tau needs 2 archs with both numbers ({int(both.sum())})"
    ax.set_title(f"Proxy reward against full-training AP\n{t}", fontsize=10)
    ax.set_xlabel("proxy reward")
    ax.set_ylabel("COCO AP (val)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig, tau, int(both.sum())


# ------------------------------------------------------------------ arch drawing


def _box(ax, x: float, y: float, w: float, h: float, text: str, colour: str, *, fontsize: float = 7) -> None:
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04", fc=colour, ec="0.3", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, family="monospace")


def _arrow(ax, a: tuple[float, float], b: tuple[float, float], *, rad: float = 0.0, colour: str = "0.35", ls: str = "-") -> None:
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=8, connectionstyle=f"arc3,rad={rad}", color=colour, lw=0.8, ls=ls, shrinkA=2, shrinkB=2))


def arch_drawing(arch: str | Arch, *, title: str = "") -> Figure:
    """The decoder of ``arch``: the C2-C5 pool, the 7 FPN blocks (inputs, ops,
    aggregation), the unread block outputs becoming P5/P4/P3 (the others added to all
    three, eq. 1), P6/P7 from P5, and the head layers (per level before ``share``,
    shared across P3-P7 from it on)."""
    a = arch if isinstance(arch, Arch) else Arch.parse(arch)
    fig = Figure(figsize=(11, 4.6))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 22)
    ax.set_ylim(-0.9, 9.2)
    ax.axis("off")
    ax.text(11, 8.85, title or f"{a.arch_id}: {a}", ha="center", va="center", fontsize=8 if len(title or str(a)) < 140 else 6)
    bw, bh = 1.1, 0.6
    c_pos = {i: (0.9, 2.8 + 1.3 * i) for i in range(NUM_BACKBONE_INPUTS)}  # C2 bottom, C5 top
    for i, p in c_pos.items():
        _box(ax, *p, bw, bh, f"C{i + 2}", "#e8e8e8")
    ax.text(0.9, 8.0, "backbone", ha="center", fontsize=7, color="0.3")
    p_pos = {lv: (19.6, 2.8 + 1.15 * (lv - 3)) for lv in range(3, 8)}  # P3 bottom, P7 top
    for lv, p in p_pos.items():
        _box(ax, *p, bw, bh, f"P{lv}", "#d9ead3")
    for lv in (5, 6):  # P6 from P5, P7 from P6: arcs on the right of the column
        _arrow(ax, (p_pos[lv][0] + bw / 2, p_pos[lv][1]), (p_pos[lv + 1][0] + bw / 2, p_pos[lv + 1][1]), rad=0.6)
    ax.text(20.6, 7.05, "3x3 s2", fontsize=6, color="0.3")
    if a.fpn is None:
        _box(ax, 10.0, 5.0, 7.0, 1.6, f"FCOS FPN{' (deformable)' if a.deform_fpn else ''}\nC3-C5: 1x1 laterals, top-down (nearest x2), 3x3 outputs", "#fff2cc")
        for i in (1, 2, 3):
            _arrow(ax, (c_pos[i][0] + bw / 2, c_pos[i][1]), (6.5, 5.0), rad=0.1)
        for lv in (3, 4, 5):
            _arrow(ax, (13.5, 5.0), (p_pos[lv][0] - bw / 2, p_pos[lv][1]), rad=-0.1)
    else:
        w = a.fpn_wiring()
        names = {i: f"C{i + 2}" for i in range(NUM_BACKBONE_INPUTS)} | {NUM_BACKBONE_INPUTS + b: f"b{b}" for b in range(NUM_FPN_BLOCKS)}
        pos = dict(c_pos)
        fw, fh = 1.95, 1.25
        half = {i: bw / 2 for i in c_pos} | {NUM_BACKBONE_INPUTS + b: fw / 2 for b in range(NUM_FPN_BLOCKS)}

        def out(i: int) -> tuple[float, float]:  # arrows leave a box at its right edge
            return (pos[i][0] + half[i], pos[i][1])

        for b, blk in enumerate(a.fpn):
            xy = (3.3 + 2.1 * b, 6.3 if b % 2 == 0 else 3.7)
            pos[NUM_BACKBONE_INPUTS + b] = xy
            op1, op2 = SHORT[FPN_OPS[blk.op1]], SHORT[FPN_OPS[blk.op2]]
            text = f"b{b} {AGGS[blk.agg]}\n{op1}({names[blk.id1]})\n{op2}({names[blk.id2]})"
            for k, src in enumerate((blk.id1, blk.id2)):
                dist = abs(pos[src][0] - xy[0])
                _arrow(ax, out(src), (xy[0] - fw / 2, xy[1] + (0.2 if k == 0 else -0.2)), rad=0.0 if dist < 2.5 else (0.2 if k == 0 else -0.2))
            _box(ax, *xy, fw, fh, text, "#fff2cc" if blk.agg == 0 else "#fce5cd")
        for idx, lv in ((w.p3, 3), (w.p4, 4), (w.p5, 5)):
            _arrow(ax, out(idx), (p_pos[lv][0] - bw / 2, p_pos[lv][1]), rad=-0.1, colour="tab:green")
        if w.extra:  # unread outputs beyond the last three: summed, added to each of P3-P5 (eq. 1)
            plus = (17.7, 1.75)
            ax.add_patch(Circle(plus, 0.28, fc="white", ec="tab:purple", lw=0.9))
            ax.text(*plus, "+", ha="center", va="center", fontsize=9, color="tab:purple")
            ax.text(plus[0], plus[1] - 0.55, "added to P3-P5", ha="center", fontsize=6, color="tab:purple")
            for e in w.extra:
                _arrow(ax, out(e), (plus[0] - 0.28, plus[1]), rad=0.15, colour="tab:purple", ls="--")
            for lv in (3, 4, 5):
                _arrow(ax, (plus[0] + 0.2, plus[1] + 0.2), (p_pos[lv][0] - bw / 2, p_pos[lv][1] - 0.15), rad=0.1, colour="tab:purple", ls="--")
    # the head: its layers in a row along the bottom, applied to every level P3-P7
    h = a.head
    if h.kind == "fcos":
        layers = ["3x3+GN"] * h.num_layers
    elif h.kind == "seq":
        layers = [SHORT[HEAD_OPS[o]] for o in h.ops]
    else:
        hname = ["p", "o0"] + [n for t in range(len(h.blocks)) for n in (f"h{t}.1", f"h{t}.2", f"h{t}")]
        layers = [f"o0 {SHORT[HEAD_OPS[h.ops[0]]]}(p)"] + [
            f"h{t} {AGGS[bk.agg]}\n{SHORT[HEAD_OPS[bk.op1]]}({hname[bk.id1]})\n{SHORT[HEAD_OPS[bk.op2]]}({hname[bk.id2]})" for t, bk in enumerate(h.blocks)
        ]
    ax.text(1.2, 0.55, f"head ({h.kind})\nper P3-P7", ha="center", va="center", fontsize=7)
    lw = min(2.4, 15.0 / max(len(layers), 1))
    for i, text in enumerate(layers):
        x = 3.0 + lw / 2 + (lw + 0.25) * i
        _box(ax, x, 0.55, lw, 1.1, f"L{i}\n{text}" if h.kind != "dag" else text, "#cfe2f3" if i >= a.share else "#f4cccc", fontsize=6.5)
        if i:
            _arrow(ax, (x - lw / 2 - 0.25, 0.55), (x - lw / 2, 0.55))
    ax.text(11, -0.65, f"share={a.share}: red layers have one copy per level, blue layers are shared across P3-P7;  "
            "ops: sep = separable conv k x k (d = dilation), def3 = deformable 3x3, skip = identity", ha="center", fontsize=6.5, color="0.3")  # fmt: skip
    return fig
