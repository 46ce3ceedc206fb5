"""What several test modules share (test modules never import each other): simulated
evaluators for the search loop, run overrides of the ``tiny`` preset, and the check of
a run's report pages."""

from __future__ import annotations

import atexit
import base64
import hashlib
import io
import json
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from flows.report.page import PLOTS
from nasfcos.search.asynchronous import run_search_async
from nasfcos.search.rows import make_row
from storage.results import ResultsTable


def record(arch, reward, status="ok", error=""):
    now = datetime.now(timezone.utc)
    return {
        "arch_id": arch.arch_id, "arch": str(arch), "status": status,
        "reward": reward if status == "ok" else float("nan"),
        "loss_cls": 0.1, "loss_reg": 0.2, "loss_ctr": 0.3, "params": 1000, "macs": 2000,
        "train_seconds": 0.01, "eval_seconds": 0.01, "peak_mem_mb": 1.0, "device": "cpu", "seed": 0,
        "error": error, "started_at": now, "finished_at": now,
    }  # fmt: skip


class Evaluator:
    """Synthetic reward (token agreement with a fixed arch); counts calls per arch; can crash."""

    def __init__(self, crash_after=None, fail=()):
        self.calls = Counter()
        self.crash_after = crash_after
        self.fail = set(fail)
        self.target = np.arange(42) % 3  # the seq head space: 42 tokens

    def __call__(self, jobs):
        for a in (j.arch for j in jobs):
            if self.crash_after is not None and sum(self.calls.values()) >= self.crash_after:
                raise KeyboardInterrupt("killed")  # not an Exception: nothing may swallow it
            self.calls[a.arch_id] += 1
            if a.arch_id in self.fail:
                yield record(a, 0.0, status="failed", error="RuntimeError: boom")
            else:
                yield record(a, float(np.mean(np.asarray(a.tokens()) == self.target)))


def token_reward(arch):
    return float(np.mean(np.asarray(arch.tokens()) == np.arange(42) % 3))  # as Evaluator


class Pool:
    """Simulated evaluations on a thread pool: each sleeps a per-arch time, appends its own
    row and an audit line (as flows.search.evaluate_decoder does), and counts calls and concurrency."""

    def __init__(self, run_dir, slots, *, fail=(), crash_after=None, kill_after=None, together=None, seconds=0.03):
        self.results, self.audit = ResultsTable(run_dir), Path(run_dir) / "evaluations.log"
        self.executor = ThreadPoolExecutor(slots)
        self.fail, self.crash_after, self.kill_after = set(fail), crash_after, kill_after
        self.calls, self.submitted, self.seconds = Counter(), 0, seconds
        self.lock = threading.Lock()
        # together=n: each evaluation waits until n are running at once (a timeout breaks the test)
        self.barrier = threading.Barrier(together) if together else None

    def submit(self, job):
        if self.crash_after is not None and self.submitted >= self.crash_after:
            raise KeyboardInterrupt("killed")
        self.submitted += 1
        return self.executor.submit(self.evaluate, job)

    def evaluate(self, job):
        a = job.arch
        if self.barrier is not None:
            self.barrier.wait(timeout=20)
        time.sleep(self.seconds * (0.2 + (int(a.arch_id[:4], 16) % 7) / 7))  # seeded by the arch: finish order varies
        failed = a.arch_id in self.fail
        rec = record(a, 0.0, "failed", "RuntimeError: boom") if failed else record(a, token_reward(a))
        # The kill comes from a thread holding the lock, so this evaluator's own row + audit
        # pair is never split (that window is the evaluator's; the loop is anywhere).
        with self.lock:
            self.calls[a.arch_id] += 1
            self.results.append([make_row(rec, step=job.step, sample=job.sample, penalty=-10.0)])
            with open(self.audit, "a") as f:
                f.write(f"{a.arch_id} {job.step} {job.sample} pid={os.getpid()}\n")
            if self.kill_after is not None and sum(self.calls.values()) >= self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        return rec


def run_async(run_dir, policy, pool, cfg, slots):
    with pool.executor:
        return run_search_async(policy=policy, submit=pool.submit, slots=slots, results=ResultsTable(run_dir), state_path=Path(run_dir) / "c.pt", cfg=cfg)


# Wall-clock, process and host facts: the only fields two runs may differ in. Files holding
# them are compared as tables with these left out; every other file byte for byte. Also what
# the attempt that finished a stage did (the shards it wrote) and a file's (size, mtime)
# stamp: a resumed run's differ; the files they stand for are compared themselves.
CLOCK_FIELDS = {"train_seconds", "eval_seconds", "peak_mem_mb", "started_at", "finished_at", "created_at", "seconds", "elapsed_s", "pid", "mtime_ns"}
ATTEMPT_FIELDS = {"shards_written", "stamp"}
# Logs and the human report carry times by design; locks are empty markers; each process
# that owned the run took an epoch (epochs/<n>.json: who and when).
# tb/: TensorBoard event files, named by time, host and pid, one per attempt (their values: tests/test_train.py)
NOT_COMPARED = ("evaluations.log", "report/", ".lock", "events.jsonl", "epochs/", "/tb/")


def _exact(value, root: str):
    """A value as comparable text that keeps every bit: floats as ``float.hex``, tensors and
    arrays as dtype, shape and a hash of their bytes; the run directory's path as a placeholder."""
    if isinstance(value, dict):
        return tuple((str(k), _exact(v, root)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0])) if k not in CLOCK_FIELDS | ATTEMPT_FIELDS)
    if isinstance(value, (list, tuple)):
        return tuple(_exact(v, root) for v in value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        return ("tensor", str(value.dtype), tuple(value.shape), hashlib.sha256(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"").hexdigest())
    if isinstance(value, np.ndarray):
        return ("array", str(value.dtype), value.shape, tuple(_exact(v, root) for v in value.tolist()) if value.dtype == object else hashlib.sha256(value.tobytes()).hexdigest())
    if isinstance(value, (float, np.floating)):
        return float(value).hex()
    return str(value).replace(root, "<run>")


def _content(path: Path, root: Path):
    """What must be equal between runs, bit for bit: bytes, or the content of a table, JSON
    or checkpoint without its clock and attempt fields (their files hold times, so their
    bytes differ)."""
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
        return _exact({c: list(df[c]) for c in df.columns}, str(root))
    data = path.read_bytes()
    if path.suffix == ".json":
        return _exact(json.loads(data), str(root))
    if path.suffix == ".pt":  # pickle lays equal contents out by object identity (a resumed training's): compare the contents
        return _exact(torch.load(path, weights_only=False, map_location="cpu"), str(root))
    return data.replace(str(root).encode(), b"<run>")


def run_files(root: Path) -> dict[str, object]:
    """Every file of a run directory (but :data:`NOT_COMPARED`) by its path, as what must be
    equal between two runs of one config and seed: compare two with ``==``."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if not any(part in rel for part in NOT_COMPARED):
            out[rel] = _content(path, root)
    return out


def tiny(run_id: str, runs_dir: Path, **extra) -> dict:
    """Overrides of the ``tiny`` preset (the demo shrunk to seconds per stage) for one run."""
    return {"run_id": run_id, "runs_dir": str(runs_dir), **extra}


def tiny_args(run_id: str, runs_dir: Path, **extra) -> list[str]:
    """``python -m flows.nas_search``'s arguments for a ``tiny`` run (as :func:`tiny`)."""
    args = ["--config", "tiny"]
    for k, v in tiny(run_id, runs_dir, **extra).items():
        args += ["--set", f"{k}={v}"]
    return args


# What a pipeline process imports, at start and in its stages: ~15 s of CPU per process here.
PIPELINE_MODULES = [
    "flows.nas_search", "flows.report.plots", "nasfcos.data", "nasfcos.engine.train", "nasfcos.engine.proxy",
    "nasfcos.engine.materialise", "nasfcos.evaluation.coco", "nasfcos.search.loop", "nasfcos.search.policies",
    "storage.features", "storage.results", "storage.staging", "sympy",
]  # fmt: skip


def pipeline_process(args, env: dict[str, str], log: Path, entry=None) -> multiprocessing.Process:
    """``python -m flows.nas_search ARGS`` under ``env``, stdout and stderr to ``log``, started
    (``entry``: another top-level function called with ``args`` instead, e.g. :func:`search_stage`).

    A real process of its own (SIGKILL it, resume it in the next one), forked from
    multiprocessing's fork server, which imports :data:`PIPELINE_MODULES` once per test
    process: the kill matrix starts eight pipelines, each ~15 s of imports sooner. (A
    server started first by ``nasfcos.engine.distributed`` imported less: its forks import
    the rest themselves, as slow as a new process, no less correct.)"""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PIPELINE_MODULES)  # no effect once the server runs
    proc = ctx.Process(target=_pipeline_main, args=(args, dict(env), str(log), entry), daemon=False)
    proc.start()
    return proc


def finish(proc: multiprocessing.Process, timeout: float) -> int | None:
    """``proc``'s exit code once it ends; SIGKILLed (and the code None) if it runs past ``timeout`` s."""
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None
    return proc.exitcode


def search_stage(overrides: dict) -> None:
    """The search stage flow alone on the ``tiny`` preset with ``overrides``, owning its run
    directory (as ``nas-search`` does) and on the task runner the config names."""
    from flows.config import load_config
    from flows.placement import task_runner
    from flows.search import search
    from flows.stages import portable
    from storage.run_dir import RunDir
    from storage.run_lock import run_lock

    cfg = load_config("tiny", overrides)
    with run_lock(RunDir.at(cfg.runs_dir, cfg.run_id).root, "search_stage (tests)"):
        out = search.with_options(task_runner=task_runner(cfg))(portable(cfg))
    print(json.dumps(out), flush=True)


def train_full_stage(overrides: dict) -> None:
    """The train-full stage flow alone on the ``tiny`` preset with ``overrides``, owning its run
    directory (as ``nas-search`` does)."""
    from flows.config import load_config
    from flows.stages import portable
    from flows.train_full import train_full
    from storage.run_dir import RunDir
    from storage.run_lock import run_lock

    cfg = load_config("tiny", overrides)
    with run_lock(RunDir.at(cfg.runs_dir, cfg.run_id).root, "train_full_stage (tests)"):
        out = train_full(portable(cfg))
    print(json.dumps(out, default=str), flush=True)


def _pipeline_main(args, env: dict[str, str], log: str, entry=None) -> None:
    """The forked process: the environment it was given (Prefect's settings re-read from
    it, as a new interpreter would), its output to ``log``, then the CLI's ``main``. What
    it shares with its server: the hash seed, and what C libraries read from the
    environment when they loaded (the kill matrix's reference is a fresh interpreter)."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1), os.dup2(fd, 2)
    from prefect.context import refresh_global_settings_context

    from flows.nas_search import main

    refresh_global_settings_context()
    atexit._clear()  # the server's exit handlers are the server's (e.g. a temp dir it shares with its forks)
    try:
        (entry or main)(args)
    finally:
        atexit._run_exitfuncs()  # Prefect drains its log and event workers at exit; a forked child skips atexit


class ReportPage(HTMLParser):
    """Tables (by the preceding <h2>) and <img> sources of report.html."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._h2, self._cell, self._row = {}, {}, None, None, None
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h2":
            self._in_h2, self._h2 = True, ""
        elif tag == "table":
            self.tables[self._h2] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images[a["alt"]] = a["src"]

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False
        elif tag in ("td", "th"):
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self.tables[self._h2].append(self._row)

    def handle_data(self, data):
        if self._in_h2:
            self._h2 += data
        if self._cell is not None:
            self._cell += data


def png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)


def report_table(page: ReportPage, title: str) -> pd.DataFrame:
    (key,) = [k for k in page.tables if k.startswith(title)]
    header, *rows = page.tables[key]
    return pd.DataFrame(rows, columns=header)


def same_cell(cell: str, value) -> bool:
    """A report cell shows the parquet value: ints exactly, floats to 4 decimals, NaN as '–'."""
    if isinstance(value, (int, np.integer)):
        return cell == str(int(value))
    if isinstance(value, (float, np.floating)):
        return cell == "–" if math.isnan(value) else abs(float(cell) - float(value)) <= 5e-5
    return cell == str(value)


def check_report(run: Path) -> ReportPage:
    """report.html embeds every plot file (each not blank), report.md links them, and
    the top-k and leaderboard tables hold the parquet files' numbers."""
    out = run / "report"
    page = ReportPage()
    page.feed((out / "report.html").read_text())
    files = {p.stem: p for p in [*out.glob("*.png"), *out.glob("detections.jpg")]}
    md = (out / "report.md").read_text()
    # detections: the best arch's val images as the evaluate stage drew them, copied beside
    assert files and set(files) <= set(PLOTS) | {"detections"} and set(page.images) == set(files), (files, set(page.images))
    for name, src in page.images.items():
        assert src.startswith("data:image/jpeg;base64," if name == "detections" else "data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data == files[name].read_bytes()
        assert len(data) < 80_000, (name, len(data))  # small: artifacts live in Prefect's database
        assert png_array(data).var() > 0, name  # not blank
        assert f"![{name}]({files[name].name})" in md
    for title, path, cols in (("Top", run / "top_k.parquet", ["rank", "arch_id", "reward", "params", "macs"]),
                              ("Leaderboard", run / "leaderboard.parquet", ["arch_id", "proxy_reward", "AP", "AP50", "AP75", "params"])):  # fmt: skip
        if not path.exists():
            continue
        want, got = pd.read_parquet(path).reset_index(drop=True), report_table(page, title)
        assert len(got) == len(want)
        for c in cols:
            assert all(same_cell(g, w) for g, w in zip(got[c], want[c], strict=True)), (title, c, list(got[c]), list(want[c]))
    return page


def tiny_feature_store(run) -> None:
    """A small random proxy feature store at the tiny preset's geometry (crop 64, 3 classes):
    the search stage's input, without running finetune and materialise."""
    import numpy as np

    from storage.features import FeatureStore

    levels = {"C2": (16, 16, 16), "C3": (32, 8, 8), "C4": (64, 4, 4), "C5": (128, 2, 2)}
    splits = {"meta_train": 16, "meta_val": 8}
    store = FeatureStore.create(run / "features.zarr", splits=splits, levels=levels, shard_size=8, attrs={"num_classes": 3, "crop": 64})
    rng = np.random.default_rng(0)
    for split in splits:
        for shard in range(store.num_shards(split)):
            b = len(range(*store.shard_range(split, shard)))
            store.write_shard(
                split, shard, features={lv: rng.standard_normal((b, *chw)).astype(np.float16) for lv, chw in levels.items()},
                image_id=np.arange(b), crop=np.tile([0, 0, 64, 64], (b, 1)), scale=np.ones((b, 2), np.float32),
                boxes=[np.array([[8.0, 8.0, 40.0, 40.0]], np.float32) for _ in range(b)], labels=[np.array([i % 3]) for i in range(b)],
            )  # fmt: skip
