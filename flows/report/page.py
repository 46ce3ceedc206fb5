"""The report of one run: plots under ``runs/<id>/report/``, ``report.html`` and ``report.md``.

    python -m flows.report runs/demo        # or: nasfcos-report runs/demo

``report.html`` is self-contained (tables, plots embedded as base64 PNGs); ``report.md``
links the PNG files beside it. Both lead with the result: the leaderboard against the
baseline (the best archs while there is none), the best arch drawn with a few of its val
detections (the evaluate stage's ``full/<arch_id>/detections.jpg``) and the reward curve;
then search statistics (archs/hour, ETA), the top-k, the other plots whose data exists
(``flows/report/plots.py``), the stages and their timings, and the config (folded in HTML). Works on a finished
run and on one still searching: every file but the results table may be missing.

The stages redraw the report when they end (the search also every ``search.plot_every``
steps) and embed their plots in their Prefect summary artifacts (:func:`stage_plots`).
Reads the run directory only; imports no Prefect, so the command starts fast.
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

import atomicio
from flows.report import plots
from flows.report.run_data import CONFIG_FILE, ReportError, RunData, check_run_dir, load_run, policy_of, search_setting
from flows.report.tables import best_searched, fmt_duration, html_text, tables
from storage.curves import read_curves

log = logging.getLogger(__name__)

# file stem -> caption, in report order
PLOTS: dict[str, str] = {
    "reward": "Reward of every sampled architecture in sampling order, the best so far and the mean of each "
    "controller step (the shape of the paper's Fig. 8); archs without a reward (failed, over budget) as crosses on the bottom edge.",
    "choices": "How often the controller chose each op, aggregation and input per FPN block and head position, in the first and the second half of the search.",
    "complexity": "Proxy reward against decoder MACs and parameters at the proxy width; the Pareto front "
    "(no arch is both cheaper and better) in red, the selected top-k and the fully trained archs ringed.",
    "proxy_vs_ap": "Proxy reward against COCO AP after full training, with Kendall's tau: how well the proxy task ranks the archs it selected.",
    "curves": "Training loss of every fully trained arch against iteration (from its TensorBoard files, full/<arch_id>/tb/), with its COCO val AP once evaluated.",
    "best_arch": "The decoder with the best proxy reward.",
    "best_ap_arch": "The fully trained decoder with the best AP (when another than the best by proxy reward).",
}
# what each stage's Prefect summary artifact shows
STAGE_PLOTS: dict[str, tuple[str, ...]] = {
    "search": ("reward", "choices", "complexity", "best_arch"),
    "select-top-k": ("complexity", "best_arch"),
    "train-full": ("curves", "complexity"),
    "evaluate": ("proxy_vs_ap", "curves", "best_ap_arch"),
}
_DPI = {"best_arch": 95, "best_ap_arch": 95}  # small text in the drawings


# ------------------------------------------------------------------ statistics


def search_stats(results: pd.DataFrame, total_archs: int | None = None, *, window: int = 100, now: datetime | None = None) -> dict[str, Any]:
    """Counts, best reward, throughput and ETA of a (possibly running) search.

    Throughput is over the last ``window`` finished archs (finish times), so a resumed
    run's pause does not count; the ETA is the archs left at that rate."""
    n = len(results)
    out: dict[str, Any] = {"archs": n, "total_archs": total_archs, "statuses": {}, "steps": 0}
    if n == 0:
        return out
    out["statuses"] = {str(k): int(v) for k, v in results["status"].value_counts().sort_index().items()}
    out["steps"] = int(results["step"].nunique())
    ok = results[(results["status"] == "ok") & np.isfinite(results["reward"].astype(float))]
    if len(ok):
        best = ok.sort_values(["reward", "arch_id"], ascending=[False, True]).iloc[0]
        out.update(best_reward=float(best["reward"]), best_arch_id=str(best["arch_id"]), best_arch=str(best["arch"]), mean_reward=float(ok["reward"].mean()))
    secs = (results["train_seconds"] + results["eval_seconds"]).astype(float)
    out["median_proxy_seconds"] = float(secs.median())
    out["devices"] = sorted(map(str, results["device"].unique()))
    fin = results["finished_at"].sort_values()
    out["first_started"] = results["started_at"].min().to_pydatetime()
    out["last_finished"] = fin.iloc[-1].to_pydatetime()
    recent = fin.iloc[-window:]
    span = (recent.iloc[-1] - recent.iloc[0]).total_seconds()
    if len(recent) >= 2 and span > 0:
        rate = (len(recent) - 1) / span * 3600.0
        out["archs_per_hour"] = rate
        if total_archs is not None:
            left = max(total_archs - n, 0)
            out["eta_seconds"] = left / rate * 3600.0
            out["eta_at"] = (now or datetime.now(timezone.utc)) + pd.Timedelta(seconds=out["eta_seconds"]).to_pytimedelta() if left else None
    return out


def search_lines(stats: dict[str, Any], *, finished: bool = False) -> list[str]:
    """The search statistics as markdown list items (report and search artifact)."""
    n, total = stats["archs"], stats.get("total_archs")
    statuses = ", ".join(f"{v} {k}" for k, v in stats["statuses"].items()) or "none yet"
    lines = [f"{n}{f' / {total}' if total else ''} archs evaluated ({statuses}) in {stats['steps']} controller steps"]
    if "best_reward" in stats:
        lines.append(f"best proxy reward {stats['best_reward']:.4f} (`{stats['best_arch_id']}`), mean {stats['mean_reward']:.4f}")
    if n:
        lines.append(f"median proxy time per arch {stats['median_proxy_seconds']:.1f} s on {', '.join(stats['devices'])}")
        lines.append(f"first arch started {stats['first_started']:%Y-%m-%d %H:%M:%S} UTC, last finished {stats['last_finished']:%Y-%m-%d %H:%M:%S} UTC")
    if "archs_per_hour" in stats:
        lines.append(f"{stats['archs_per_hour']:.1f} archs/hour (over the last {min(n, 100)} archs)")
    if finished or (total and n >= total):
        lines.append("search finished")
    elif stats.get("eta_seconds") is not None:
        lines.append(f"ETA {fmt_duration(stats['eta_seconds'])} ({stats['eta_at']:%Y-%m-%d %H:%M} UTC) for the {total - n} archs left")
    elif total is None:
        lines.append("ETA unknown: the search budget (search.total_archs) is not recorded in this run directory yet")
    return [f"- {line}" for line in lines]


# ---------------------------------------------------------------------- plots


def draw(data: RunData, names: Sequence[str] | None = None) -> dict[str, bytes | None]:
    """PNG bytes of the plots ``names`` (default: all of :data:`PLOTS`) by file stem;
    None for one whose data does not exist yet."""
    res = data.results
    stats = search_stats(res)

    def reward():
        curves = {str(p): d for p, d in res.groupby("policy")} if "policy" in res.columns else {policy_of(data.config): res}
        return plots.reward_curve({**curves, **data.compare}, reward=str(search_setting(data.config, "reward", "loss")))

    def complexity():
        top = [] if data.top_k is None else data.top_k["arch_id"].tolist()
        return plots.reward_vs_complexity(res, top_k=top, trained=data.trained)

    def best_arch():
        if "best_arch" not in stats:
            return None
        return plots.arch_drawing(stats["best_arch"], title=f"best proxy reward {stats['best_reward']:.4f}: {stats['best_arch_id']}  {stats['best_arch']}")

    def proxy_vs_ap():
        drawn = plots.reward_vs_ap(data.board) if data.board is not None and len(data.board) else None
        return None if drawn is None else drawn[0]

    def best_ap_arch():
        best = best_searched(data.board)
        if best is None or "arch" not in best:
            return None
        if str(best["arch_id"]) == stats.get("best_arch_id"):
            return None  # drawn as best_arch already
        return plots.arch_drawing(str(best["arch"]), title=f"best AP {float(best['AP']):.4f}: {best['arch_id']}  {best['arch']}")

    def curves():
        full = data.root / "full"
        return plots.loss_curves({p.name: read_curves(p) for p in full.iterdir() if p.is_dir()} if full.is_dir() else {})

    builders = {"reward": reward, "choices": lambda: plots.choice_frequencies(res), "complexity": complexity,
                "proxy_vs_ap": proxy_vs_ap, "curves": curves, "best_arch": best_arch, "best_ap_arch": best_ap_arch}  # fmt: skip
    out: dict[str, bytes | None] = {}
    for name in PLOTS if names is None else names:
        fig = builders[name]()
        out[name] = None if fig is None else plots.png(fig, dpi=_DPI.get(name, plots.DPI))
    return out


def data_uri(image: bytes) -> str:
    mime = "image/jpeg" if image[:3] == b"\xff\xd8\xff" else "image/png"  # the evaluate stage's detections are JPEG
    return f"data:{mime};base64," + base64.b64encode(image).decode()


def markdown_images(pngs: dict[str, bytes], names: Sequence[str]) -> str:
    """Markdown embedding ``names`` (those drawn) as data URIs: the Prefect UI shows them."""
    return "\n\n".join(f"![{n}]({data_uri(pngs[n])})" for n in names if n in pngs)


def best_detections(data: RunData) -> tuple[str, bytes] | None:
    """(arch id, PNG) of a few val images with the detections of the searched arch with the best
    AP, drawn by the evaluate stage (``full/<arch_id>/detections.jpg``); None before that."""
    best = best_searched(data.board)
    path = None if best is None else data.root / "full" / str(best["arch_id"]) / "detections.jpg"
    return (str(best["arch_id"]), path.read_bytes()) if path is not None and path.is_file() else None


# --------------------------------------------------------------------- writing


@dataclass
class Report:
    dir: Path
    html: Path
    markdown: Path
    plots: dict[str, Path]
    pngs: dict[str, bytes]
    stats: dict[str, Any]


def write_report(
    path: str | Path, *, config: dict | None = None, compare: Sequence[str | Path] = (), total_archs: int | None = None, redraw: Sequence[str] | None = None
) -> Report:
    """Draw the plots and write ``report/report.html`` and ``report/report.md`` of the run
    at ``path``; ``config`` (the stages pass theirs) is kept as ``report/config.json``.
    ``redraw``: only these plots are drawn again, the others' files are reused (a stage
    redraws what it changed, :data:`STAGE_PLOTS`); default all."""
    root = check_run_dir(path)
    out = root / "report"
    out.mkdir(exist_ok=True)
    atomicio.remove_orphans(out)  # left by a writer killed mid-write (a young one may be another writer's)
    if config is not None:
        atomicio.write_json(out / CONFIG_FILE, config)
    data = load_run(root, compare=compare)
    total = total_archs or search_setting(data.config, "total_archs")
    stats = search_stats(data.results, total)
    fresh = draw(data, None if redraw is None else [n for n in PLOTS if n in redraw or not (out / f"{n}.png").exists()])
    pngs, paths = {}, {}
    for name in PLOTS:
        p = out / f"{name}.png"
        if name in fresh and fresh[name] is None:
            p.unlink(missing_ok=True)  # e.g. best_ap_arch when the best by AP became the best by reward
            continue
        if name in fresh:
            atomicio.write_bytes(p, fresh[name])
        pngs[name], paths[name] = fresh.get(name) or p.read_bytes(), p
    title = f"nasfcos run {(data.config or {}).get('run_id') or root.name}"
    made = f"{root} · written {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
    # a search manifest from before search.total_archs was raised does not make it finished
    search = search_lines(stats, finished="search" in data.manifests and (total is None or stats["archs"] >= total))
    tabs = tables(data)
    # what a reader came for first (the result, the best arch and its detections, the reward
    # curve), then the search's numbers, the other plots, and the stages and config last
    caption = {**PLOTS}
    shown = best_detections(data)
    if shown:  # a copy beside the report: report.md links its PNGs there, and the folder travels alone
        atomicio.write_bytes(out / "detections.jpg", shown[1])
        pngs, paths["detections"] = {**pngs, "detections": shown[1]}, out / "detections.jpg"
        caption["detections"] = (
            f"A few val images with the confident detections of {shown[0]}, the searched arch with the best AP, as the evaluate stage drew them (full/{shown[0]}/detections.jpg)."
        )
    else:
        (out / "detections.jpg").unlink(missing_ok=True)
    lead = [n for n in ("best_ap_arch" if "best_ap_arch" in pngs else "best_arch", "detections", "reward") if n in pngs]
    rest = [n for n in pngs if n not in lead]
    first = [tabs.pop("result")] if "result" in tabs else []
    stages, config = tabs.pop("stages"), tabs.pop("config")
    md = [f"# {title}", "", made, ""] + [t.markdown() + "\n" for t in first]
    md += [f"![{n}]({paths[n].name})\n\n{caption[n]}\n" for n in lead]
    md += ["## Search", "", *search, ""] + [t.markdown() + "\n" for t in tabs.values()]
    md += ["## Plots", ""] + [f"![{n}]({n}.png)\n\n{PLOTS[n]}\n" for n in rest] + [stages.markdown() + "\n", config.markdown() + "\n"]
    atomicio.write_text(out / "report.md", "\n".join(md))
    e = html_text

    def figure(name: str, png: bytes) -> str:
        return f'<figure id="{name}"><img alt="{name}" src="{data_uri(png)}"><figcaption>{e(caption[name])}</figcaption></figure>'

    body = [f"<h1>{e(title)}</h1>", f"<p class=meta>{e(made)}</p>"] + [t.html() for t in first]
    body += [figure(n, pngs[n]) for n in lead]
    body += ["<h2>Search</h2>", "<ul>"] + [f"<li>{e(line[2:]).replace('`', '')}</li>" for line in search] + ["</ul>"]
    body += [t.html() for t in tabs.values()]
    body += ["<h2>Plots</h2>"] + [figure(n, pngs[n]) for n in rest] + [stages.html()]
    body += [f"<details><summary>Config ({len(config.rows)} fields, as the stages last ran it)</summary>", config.html(), "</details>"]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;max-width:600px;overflow-wrap:anywhere}"
             "th{background:#eee}img{max-width:100%}figcaption{color:#555;font-size:13px}.meta{color:#777}")  # fmt: skip
    page = f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    atomicio.write_text(out / "report.html", page)
    return Report(out, out / "report.html", out / "report.md", paths, pngs, stats)


def stage_plots(path: str | Path, config: dict, stage: str, *, logger: logging.Logger | logging.LoggerAdapter | None = None, finished: bool = True) -> str:
    """Redraw the run's report and return markdown for ``stage``'s Prefect summary artifact:
    its plots (:data:`STAGE_PLOTS`) as data URIs, and for the search its statistics
    (``finished``: the stage ends, no ETA). A report that cannot be drawn is logged and
    gives '': a plot never fails a stage."""
    try:
        rep = write_report(path, config=config, redraw=STAGE_PLOTS.get(stage, ()))
    except Exception as e:  # noqa: BLE001 - the report is a view; the stage's outputs are what count
        (logger or log).warning("report of %s not written: %s: %s", path, type(e).__name__, e)
        return ""
    parts = ["\n".join(search_lines(rep.stats, finished=finished))] if stage == "search" else []
    parts.append(markdown_images(rep.pngs, STAGE_PLOTS.get(stage, ())))
    parts.append(f"Report: `{rep.html}`")
    return "\n\n" + "\n\n".join(p for p in parts if p)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="nasfcos-report", description="Write report.html (self-contained) and report.md, with plots, into RUN_DIR/report/.")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/demo (finished or still searching)")
    ap.add_argument("--compare", action="append", default=[], metavar="RUN_DIR", help="another run whose reward curve to draw beside (e.g. random search)")
    ap.add_argument("--total-archs", type=int, default=None, help="search budget for the ETA when the run dir does not record it")
    args = ap.parse_args(argv)
    try:
        rep = write_report(args.run_dir, compare=args.compare, total_archs=args.total_archs)
    except ReportError as e:
        sys.exit(f"nasfcos-report: {e}")
    except (ValueError, OSError) as e:  # e.g. a results table of another schema version
        sys.exit(f"nasfcos-report: {args.run_dir}: {type(e).__name__}: {' '.join(str(e).split())}")
    print(f"{rep.html}\n{rep.markdown}\n{len(rep.plots)} plots: {', '.join(rep.plots) or 'none yet'}")


if __name__ == "__main__":
    main()
