"""benchmarks/strategies.py --small: every strategy runs through the product's search loop at an
equal budget and the comparison table comes out (the full runs are in benchmarks/RESULTS.md)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_small_strategy_comparison_runs(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    p = subprocess.run([sys.executable, "benchmarks/strategies.py", "--small", "--rows", str(rows)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    table = {line.split("|")[1].strip(): line for line in p.stdout.splitlines() if line.startswith("| ") and "strategy" not in line}
    assert set(table) == {"ppo", "random", "evolution", "ppo+sh", "random+sh", "evolution+sh"}, p.stdout
    for name, line in table.items():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[1] == "2" and 58 <= float(cells[7]) <= 66, line  # 2 seeds; the budget (60 full evals) spent, one evaluation over at most
        assert ("tau" not in line) and ("ep " in cells[9]) == name.endswith("+sh"), line
    assert len(rows.read_text().splitlines()) == 12
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from strategies import main

    main(["--small", "--rows", str(rows)])  # in this process: the command line was run above
    assert " seed " not in capsys.readouterr().out  # finished runs are not repeated


def test_kendall_tau_and_intervals_are_hand_checked():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from strategies import kendall_tau, mean_ci

    # pairs (1,2)(1,3)(2,3): x order 1<2<3, y 1<3>2 -> 2 concordant, 1 discordant: tau = 1/3
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    m, ci = mean_ci([1.0, 3.0])  # sd 1.414, t(1) 12.706: 12.706 * 1.414 / 1.414 = 12.706
    assert (m, round(ci, 3)) == (2.0, 12.706)
