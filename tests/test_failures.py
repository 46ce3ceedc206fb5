"""Failure classes: arch failures are recorded, infrastructure failures are retried and
never recorded against the arch, and a circuit breaker stops a search that only fails."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Evaluator, Pool, run_async

import nasfcos.engine.proxy as proxy
from nasfcos.errors import EvaluationLost, InfrastructureError, is_infrastructure
from nasfcos.search.controller import PPOController
from nasfcos.search.failures import SearchHalted
from nasfcos.search.loop import SearchConfig
from nasfcos.search.policies import RandomPolicy
from nasfcos.search.rows import lost_record
from nasfcos.search.sync import run_search
from storage.results import ResultsTable


def test_which_errors_are_the_machines():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not is_infrastructure(oom) and is_infrastructure(oom, device_shared=True)  # alone: the arch is too big
    for e in (
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1234, unhandled system error"),
        RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
        OSError(28, "No space left on device"),
        TimeoutError("Task run exceeded timeout of 7200 second(s)"),
        InfrastructureError("lost"),
        MemoryError(),
    ):
        assert is_infrastructure(e), e
    for e in (FloatingPointError("non-finite loss"), RuntimeError("Given groups=1, weight of size [64, 3, 3]"), ValueError("bad arch")):
        assert not is_infrastructure(e, device_shared=True), e
    # what an evaluation task raises (issue #26): retried in place only when it is the machine's
    assert is_infrastructure(EvaluationLost("RuntimeError: CUDA error: launch failure", "tcp://10.0.0.7:4321"))
    assert not is_infrastructure(EvaluationLost("OutOfMemoryError: CUDA out of memory", "cuda:0", "contention"))  # run again alone instead
    assert not is_infrastructure(EvaluationLost("KeyError: 'x'", "cuda:0", "error"))
    lost = lost_record("abc", EvaluationLost("OutOfMemoryError: CUDA out of memory", "cuda:1", "contention"))
    assert lost == {"arch_id": "abc", "status": "lost", "error": "OutOfMemoryError: CUDA out of memory", "worker": "cuda:1", "alone": True}


@pytest.fixture(scope="module")
def splits():
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(4, c, s, s, generator=g) for k, c, s in (("C2", 4, 16), ("C3", 8, 8), ("C4", 8, 4), ("C5", 8, 2))}
    boxes, labels = [np.array([[4.0, 4.0, 40.0, 40.0]], dtype=np.float32)] * 4, [np.array([1])] * 4
    s = proxy.prepare_split(feats, boxes, labels, num_classes=2)
    return s, s


@pytest.mark.parametrize(
    "error, shared, raises",
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False, True),
        (torch.OutOfMemoryError("CUDA out of memory"), True, True),
        (torch.OutOfMemoryError("CUDA out of memory"), False, False),
        (FloatingPointError("non-finite validation loss"), True, False),
    ],
)
def test_evaluate_arch_raises_infrastructure_failures_and_records_arch_failures(splits, monkeypatch, error, shared, raises):
    def broken(*a, **k):
        raise error

    monkeypatch.setattr(proxy, "train_proxy", broken)
    cfg = proxy.ProxyConfig(epochs=1, batch_size=4)
    if raises:
        with pytest.raises(type(error)):
            proxy.evaluate_arch("fpn-fcos", *splits, num_classes=2, cfg=cfg, device_shared=shared)
    else:
        rec = proxy.evaluate_arch("fpn-fcos", *splits, num_classes=2, cfg=cfg, device_shared=shared)
        assert rec["status"] == "failed" and type(error).__name__ in rec["error"]


class FlakyPool(Pool):
    """Pool whose evaluations of ``flaky`` archs raise an infrastructure error the first
    ``times`` times; ``always``: every evaluation raises; ``hang``: the first
    evaluation of that arch never returns (a call hung in the device)."""

    def __init__(self, *a, flaky=(), times=1, always=False, hang=None, **k):
        super().__init__(*a, **k)
        self.flaky, self.times, self.always, self.hang = set(flaky), times, always, hang
        self.raised, self.release = {}, threading.Event()

    def evaluate(self, job):
        aid = job.arch.arch_id
        if self.always or (aid in self.flaky and self.raised.get(aid, 0) < self.times):
            self.raised[aid] = self.raised.get(aid, 0) + 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if aid == self.hang and not self.raised.get(aid):
            self.raised[aid] = 1
            self.release.wait(3)  # hung well past lost_after_s
            raise RuntimeError("CUDA error: the hung call returned late")
        return super().evaluate(job)


def _audit(run_dir):
    return [line.split()[0] for line in (Path(run_dir) / "evaluations.log").read_text().splitlines()]


def test_async_resubmits_an_arch_whose_evaluation_failed_and_never_marks_it_failed(tmp_path):
    policy = RandomPolicy(seed=3)
    first = RandomPolicy(seed=3).sample(2)
    flaky = {s.arch.arch_id for s in first}
    pool = FlakyPool(tmp_path, 2, flaky=flaky, times=2)
    summary = run_async(tmp_path, policy, pool, SearchConfig(total_archs=6, archs_per_step=2), slots=2)
    df = ResultsTable(tmp_path).read()
    assert summary.unique_archs == len(df) == 6 and (df.status == "ok").all()
    assert flaky <= set(df.arch_id) and all(pool.raised[a] == 2 for a in flaky)
    ids = _audit(tmp_path)
    assert len(ids) == len(set(ids)) == 6  # one completed evaluation per arch


def test_the_circuit_breaker_stops_a_search_that_only_fails(tmp_path):
    pool = FlakyPool(tmp_path / "infra", 2, always=True)
    with pytest.raises(SearchHalted, match=r"search stopped: every worker is drained \(\(local\)\); \d+ evaluations in a row failed \(last: \w+: RuntimeError: CUDA error"):
        run_async(tmp_path / "infra", RandomPolicy(seed=0), pool, SearchConfig(total_archs=8, archs_per_step=2, max_consecutive_failures=5), slots=2)
    # arch failures count too: a search whose every arch fails stops instead of ending Completed
    policy = RandomPolicy(seed=0)
    bad = {s.arch.arch_id for s in RandomPolicy(seed=0).sample(40)}
    with pytest.raises(SearchHalted, match=r"every worker is drained .*; \d+ evaluations in a row failed on "):
        run_async(tmp_path / "arch", policy, Pool(tmp_path / "arch", 2, fail=bad), SearchConfig(total_archs=30, archs_per_step=2, max_consecutive_failures=4), slots=2)
    assert len(ResultsTable(tmp_path / "arch")) >= 4


def test_async_gives_up_on_a_hung_evaluation_and_resubmits_its_arch(tmp_path):
    hung = RandomPolicy(seed=5).sample(1)[0].arch.arch_id
    pool = FlakyPool(tmp_path, 2, hang=hung)
    try:
        summary = run_async(tmp_path, RandomPolicy(seed=5), pool, SearchConfig(total_archs=4, archs_per_step=2, lost_after_s=1.0), slots=2)
    finally:
        pool.release.set()
    df = ResultsTable(tmp_path).read()
    assert summary.unique_archs == 4 and hung in set(df.arch_id) and (df.status == "ok").all()
    assert _audit(tmp_path).count(hung) == 1


def test_sync_evaluates_a_lost_arch_again_and_stays_reproducible(tmp_path):
    """Sync mode: a lost evaluation is redone within its step, so the search equals one
    without the failure (bit-reproducible mode)."""

    class Flaky(Evaluator):
        def __init__(self):
            super().__init__()
            self.lost = set()

        def __call__(self, jobs):
            for job in jobs:
                if job.arch.arch_id not in self.lost:
                    self.lost.add(job.arch.arch_id)
                    yield lost_record(job.arch.arch_id, RuntimeError("CUDA error: launch failure"))
                else:
                    yield from super().__call__([job])

    cfg = SearchConfig(total_archs=4, archs_per_step=2)
    out = {}
    for name, ev in (("clean", Evaluator()), ("flaky", Flaky())):
        run_search(policy=PPOController(seed=0), evaluate=ev, results=ResultsTable(tmp_path / name), state_path=tmp_path / name / "c.pt", cfg=cfg)
        out[name] = ResultsTable(tmp_path / name).read()[["arch_id", "step", "sample", "reward"]]
    assert out["clean"].equals(out["flaky"])

    def always_lost(jobs):
        for job in jobs:
            yield lost_record(job.arch.arch_id, OSError(5, "Input/output error"))

    with pytest.raises(SearchHalted, match=r"every worker is drained .*; \d+ evaluations in a row failed"):
        cfg = SearchConfig(total_archs=4, archs_per_step=2, max_consecutive_failures=3)
        run_search(policy=RandomPolicy(seed=0), evaluate=always_lost, results=ResultsTable(tmp_path / "h"), state_path=tmp_path / "h" / "c.pt", cfg=cfg)


def test_sync_refuses_an_evaluator_that_answers_nothing_for_an_arch(tmp_path):
    """A lost record is an answer (evaluated again); no record at all is a broken evaluator."""

    def half(jobs):
        yield lost_record(jobs[0].arch.arch_id, RuntimeError("CUDA error: launch failure"))  # the others: silence

    cfg = SearchConfig(total_archs=4, archs_per_step=2)
    with pytest.raises(RuntimeError, match="evaluator returned no record for 1 archs"):
        run_search(policy=RandomPolicy(seed=0), evaluate=half, results=ResultsTable(tmp_path), state_path=tmp_path / "c.pt", cfg=cfg)


@pytest.mark.parametrize(
    "error, kw, expected",
    [
        (ValueError("bad value"), {}, "ValueError: bad value"),
        (ValueError("bad value"), {"with_type": False}, "bad value"),
        (RuntimeError(""), {}, "RuntimeError"),  # an empty message: the type
        (RuntimeError(""), {"with_type": False}, "RuntimeError"),
        (OSError("libjpeg: corrupt\n  marker 0xd9\n"), {"with_type": False}, "libjpeg: corrupt marker 0xd9"),  # lines joined
        (ValueError("x" * 600), {}, "ValueError: " + "x" * 488),  # at most limit (500) characters
        (ValueError("x" * 600), {"limit": 20}, "ValueError: xxxxxxxx"),
        # a DataLoader worker's error: its last line, the one that says what went wrong
        (
            RuntimeError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n  File ...\nValueError: a.jpg: cannot decode image"),
            {"with_type": False},
            "a.jpg: cannot decode image",
        ),  # fmt: skip
        ("plain text\nsecond line", {}, "plain text second line"),  # a string: no type
    ],
)
def test_one_line_is_the_one_error_to_one_line_helper(error, kw, expected):
    from nasfcos.errors import one_line

    assert one_line(error, **kw) == expected
