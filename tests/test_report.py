"""The run report (flows/report/page.py) and its plots (flows/report/plots.py), on run directories
written here: a finished run with a baseline, one still searching, a bad path."""

import math
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import check_report, png_array, report_table
from torchvision.io import encode_jpeg

import atomicio
from flows.report import plots
from flows.report.page import PLOTS, main, search_stats, write_report
from nasfcos.engine.curves import add_scalars
from storage.results import ResultsTable
from storage.run_dir import RunDir

T0 = datetime(2026, 11, 26, 6, 0, tzinfo=timezone.utc)


def _rows(n: int, *, seed: int = 0, failed: tuple[int, ...] = ()) -> list[dict]:
    """``n`` distinct random archs, 4 per step, one finishing every 60 s from T0."""
    from nasfcos.arch import Arch

    rng = np.random.default_rng(seed)
    archs: dict[str, Arch] = {}
    while len(archs) < n:
        a = Arch.random(rng)
        archs.setdefault(a.arch_id, a)
    rows = []
    for i, a in enumerate(archs.values()):
        ok = i not in failed
        rows.append({
            "arch_id": a.arch_id, "arch": str(a), "step": i // 4, "sample": i % 4, "status": "ok" if ok else "failed",
            "reward": float(-3 - rng.random()) if ok else float("nan"), "reward_used": float(-3 - rng.random()) if ok else -10.0,
            "loss_cls": 1.0, "loss_reg": 1.0, "loss_ctr": 1.0, "params": int(rng.integers(10**5, 10**7)), "macs": int(rng.integers(10**7, 10**9)),
            "train_seconds": 5.0, "eval_seconds": 1.0, "peak_mem_mb": 10.0, "device": "cpu", "seed": 0,
            "error": "" if ok else "FloatingPointError: non-finite loss", "started_at": T0 + timedelta(seconds=60 * i - 6),
            "finished_at": T0 + timedelta(seconds=60 * i), **a.columns(),
        })  # fmt: skip
    for r in rows:  # a failed row's reward_used must be the penalty, an ok row's its reward
        if r["status"] == "ok":
            r["reward_used"] = r["reward"]
    return rows


def finished_run(root: Path) -> Path:
    """A run through evaluate: 12 archs (one failed), top 4, 2 trained + the fpn-fcos baseline
    (no proxy reward), the best AP not the best proxy reward."""
    run = RunDir.at(root, "r1")
    table = ResultsTable(run.root)
    table.append(_rows(12, failed=(5,)))
    table.compact()
    run.finish("search", "h", {"unique_archs": 12})
    top = table.write_top_k(run.top_k, k=4)
    run.finish("select-top-k", "h", {"top_k": str(run.top_k)})
    for aid in top.arch_id[:2]:
        (run.full(aid)).mkdir(parents=True)
        (run.full(aid) / "checkpoint.pt").write_bytes(b"x")
        for it in (10, 20, 30):  # its training curves, as nasfcos.engine.train writes them
            add_scalars(run.full(aid), it, {"loss/total": 3.0 - it / 20})
    board = top.head(2)[["arch_id", "arch", "reward", "params", "macs"]].rename(columns={"reward": "proxy_reward"})
    board = board.assign(kind="searched", AP=[0.31, 0.42], AP50=[0.55, 0.61], AP75=[0.3, 0.4], APs=[0.1, 0.2], APm=[0.3, 0.4], APl=[-1.0, 0.5], status="ok", error="")
    base = {"kind": "baseline", "arch_id": "9e8cd1ca8e1e", "arch": "fpn-fcos", "proxy_reward": float("nan"), "params": 3_000_000, "macs": 9 * 10**8,
            "AP": 0.35, "AP50": 0.58, "AP75": 0.33, "APs": 0.12, "APm": 0.36, "APl": 0.41, "status": "ok", "error": ""}  # fmt: skip
    board = pd.concat([board, pd.DataFrame([base])], ignore_index=True).sort_values("AP", ascending=False)
    board.to_parquet(run.leaderboard)
    best = board[board.kind == "searched"].iloc[0].arch_id  # AP 0.42: its val detections, as evaluate draws them
    drawing = torch.from_numpy(png_array(plots.png(plots.arch_drawing("fpn-fcos"))).astype("uint8")).permute(2, 0, 1).contiguous()
    atomicio.write_bytes(run.full(best) / "detections.jpg", encode_jpeg(drawing).numpy().tobytes())
    run.finish("evaluate", "h", {"leaderboard": str(run.leaderboard)})
    return run.root


def test_report_of_a_finished_run_embeds_every_plot_and_the_parquet_numbers(tmp_path, capsys):
    run = finished_run(tmp_path)
    config = {"run_id": "r1", "runs_dir": str(tmp_path), "search": {"total_archs": 12, "policy": "ppo"}}
    atomicio.write_json(run / "report" / "config.json", config)  # as the stages keep it for the command
    main([str(run)])
    assert "report.html" in capsys.readouterr().out
    page = check_report(run)
    assert set(page.images) == set(PLOTS) | {"detections"}  # every plot has its data here (best AP != best reward)
    html = (run / "report" / "report.html").read_text()
    # the result first (leaderboard, best arch by AP and its detections, reward curve), the config last and folded
    order = [
        "Leaderboard",
        'id="best_ap_arch"',
        'id="detections"',
        'id="reward"',
        "<h2>Search</h2>",
        "Top 4 by proxy reward",
        "<h2>Plots</h2>",
        "<h2>Stages</h2>",
        "<details><summary>Config",
    ]
    assert [html.index(k) for k in order] == sorted(html.index(k) for k in order)
    assert html.rstrip().endswith("</table>\n</details>\n</body></html>")
    board = report_table(page, "Leaderboard")
    base = board[board.kind == "baseline"].iloc[0]
    assert base.proxy_reward == "–" and base.AP == "0.3500"
    res = ResultsTable(run).read()
    html = (run / "report" / "report.html").read_text()
    best = res[res.status == "ok"].reward.max()
    assert "12 / 12 archs evaluated (1 failed, 11 ok)" in html and f"best proxy reward {best:.4f}" in html
    # Kendall's tau over the two searched archs with both numbers (the baseline has no reward)
    s = pd.read_parquet(run / "leaderboard.parquet").query("kind == 'searched'")
    tau = plots.kendall_tau(s.proxy_reward, s.AP)
    assert abs(tau) == 1.0 and f"Kendall's tau of proxy reward against AP: {tau:.4f} over 2 archs" in html
    assert "search finished" in html and "ETA" not in html


def test_report_of_a_run_still_searching(tmp_path):
    """Only uncompacted parts of results, no manifests: search plots, archs/hour, ETA."""
    root = tmp_path / "r2"
    ResultsTable(root).write_part(_rows(6))
    (root / "manifests").mkdir()
    rep = write_report(root, config={"run_id": "r2", "search": {"total_archs": 30}})
    assert set(rep.plots) == {"reward", "choices", "complexity", "best_arch"}
    check_report(root)
    # 6 archs finished 60 s apart: 5 intervals in 300 s = 60 archs/hour; 24 left = 24 min
    assert rep.stats["archs_per_hour"] == pytest.approx(60.0)
    assert rep.stats["eta_seconds"] == pytest.approx(24 * 60.0)
    md = rep.markdown.read_text()
    assert "6 / 30 archs evaluated (6 ok)" in md and "60.0 archs/hour" in md and "ETA 24 min 00 s" in md
    assert "| search | started, not finished |" in md and "| select-top-k | not started |" in md
    assert "Leaderboard" not in md


def test_a_bad_run_dir_is_one_line_and_a_nonzero_exit(tmp_path):
    for path, msg in ((tmp_path / "nope", "no such run directory"), (tmp_path, "not a run directory")):
        with pytest.raises(SystemExit) as e:
            main([str(path)])
        assert isinstance(e.value.code, str) and e.value.code.startswith(f"nasfcos-report: {path}: {msg}")
        assert "\n" not in e.value.code


def test_kendall_tau_and_pareto_front_on_hand_computed_cases():
    # 6 pairs, one discordant (2,3 vs 3,2): (5 - 1) / 6
    assert plots.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # tau-b with a tie in x: pairs (0,1) tied in x, (0,2) and (1,2) concordant: 2 / sqrt((3-1) * 3)
    assert plots.kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(plots.kendall_tau([1], [2]))
    # cost, reward: (1, 1) (2, 3) (3, 2) (4, 5): (3, 2) is beaten by (2, 3)
    assert plots.pareto_front([3, 1, 4, 2], [2, 1, 5, 3]).tolist() == [1, 3, 2]


def test_search_stats_handle_empty_results_and_other_statuses():
    empty = ResultsTable("/nonexistent").read()
    assert search_stats(empty, 10) == {"archs": 0, "total_archs": 10, "statuses": {}, "steps": 0}
    df = pd.DataFrame(_rows(4)).assign(status=["ok", "ok", "over_budget", "ok"])
    s = search_stats(df, None, now=T0)
    assert s["statuses"] == {"ok": 3, "over_budget": 1} and "eta_seconds" not in s and s["archs_per_hour"] == pytest.approx(60.0)


@pytest.mark.parametrize("arch", ["fpn-fcos", "nas-fcos", "dag"])
def test_arch_drawing_of_each_head_kind_is_not_blank(arch):
    from nasfcos.arch import Arch

    a = Arch.random(np.random.default_rng(1), head="dag") if arch == "dag" else arch
    assert png_array(plots.png(plots.arch_drawing(a))).var() > 0


def test_stage_plots_never_fail_a_stage(tmp_path, caplog):
    from flows.report.page import stage_plots

    assert stage_plots(tmp_path / "missing", {}, "search") == ""
    assert "report of" in caplog.text and "not written" in caplog.text
    assert re.search(r"no such run directory", caplog.text)


def test_the_reward_curve_draws_every_compared_run_however_many():
    """More runs than colours: colours are reused, no run is dropped (a 6th run was, once)."""
    runs = {f"run{i}": pd.DataFrame(_rows(8, seed=i)) for i in range(len(plots._COLOURS) + 2)}
    fig = plots.reward_curve(runs)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert [lab.split(":")[0] for lab in labels if "each arch" in lab] == list(runs)


def test_the_reward_axis_says_which_reward_the_search_used():
    df = pd.DataFrame(_rows(8, seed=0))
    assert "val loss" in plots.reward_curve({"ppo": df}).axes[0].get_ylabel()
    assert "AP" in plots.reward_curve({"ppo": df}, reward="ap").axes[0].get_ylabel()
