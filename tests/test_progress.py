"""Progress: a bar on a terminal, periodic log lines elsewhere, and nothing left behind."""

import logging

import pytest

from nasfcos.progress import Progress, fmt_eta


def test_log_lines_off_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="nasfcos.progress")
    with Progress(5, "shards", unit="task", every_s=0.0, terminal=False) as p:
        for _ in range(5):
            p.update(1, loss=0.25)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and lines[-1].startswith("shards 5/5 task") and "eta" in lines[-1] and "loss 0.25" in lines[-1]


def test_log_lines_are_rate_limited_and_the_last_is_always_written(caplog):
    caplog.set_level(logging.INFO, logger="nasfcos.progress")
    with Progress(100, "train", every_s=3600.0, terminal=False) as p:
        for _ in range(100):
            p.update(1)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["train 100/100 it"]


def test_silent_off_a_terminal_when_the_loop_logs_itself(caplog):
    caplog.set_level(logging.INFO, logger="nasfcos.progress")
    with Progress(3, "train", every_s=0.0, log_lines=False, terminal=False) as p:
        p.update(3)
    assert not caplog.records


def test_bar_on_a_terminal_resumes_and_restores_logging(capsys):
    root = logging.getLogger()
    handlers = list(root.handlers)
    with pytest.raises(RuntimeError):
        with Progress(10, "train", initial=4, terminal=True) as p:
            p.update(6, loss=0.5)
            assert p.done == 10
            raise RuntimeError("boom")
    err = capsys.readouterr().err
    assert "train" in err and "10/10" in err and "loss=0.5" in err
    assert root.handlers == handlers  # tqdm's logging redirect undone after an error


def test_eta():
    assert fmt_eta(float("inf")) == "?" and fmt_eta(75) == "1m15s" and fmt_eta(3 * 3600 + 120) == "3h02m"
