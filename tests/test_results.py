"""storage/results.py: schema, arch columns, dedup rule, queries, concurrency and crash safety."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import random
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import atomicio
import storage.results as R
from nasfcos import arch as space
from nasfcos.arch import Arch
from storage.results import DECODED_FIELDS, RECORD_FIELDS, SCHEMA, ResultsTable

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
PENALTY = -10.0


def _archs(n: int, seed: int = 0) -> list[space.Arch]:
    """``n`` distinct random searched archs (FPN blocks + a seq or a dag head, in turn), seeded."""
    rng = np.random.default_rng(seed)
    out: dict[str, space.Arch] = {}
    while len(out) < n:
        a = space.Arch.random(rng, head=("seq", "dag")[len(out) % 2])
        out.setdefault(a.arch_id, a)
    return list(out.values())


def make_row(arch, step=0, sample=0, status="ok", reward=0.5, **kw) -> dict:
    """A valid row (RECORD_FIELDS and the arch's columns) for ``arch``; ``kw`` overrides fields."""
    ok = status == "ok"
    start = T0 + timedelta(seconds=int(100 * step + sample))
    row = dict(
        arch_id=arch.arch_id,
        arch=str(arch),
        step=step,
        sample=sample,
        status=status,
        reward=reward if ok else math.nan,
        reward_used=reward if ok else PENALTY,
        loss_cls=0.3 if ok else math.nan,
        loss_reg=0.2 if ok else math.nan,
        loss_ctr=0.1 if ok else math.nan,
        params=12345 if ok else -1,
        macs=678910 if ok else -1,
        train_seconds=1.5,
        eval_seconds=0.25,
        peak_mem_mb=33.0 if ok else math.nan,
        device="cpu",
        seed=7,
        error="" if ok else "RuntimeError: CUDA out of memory",
        started_at=start,
        finished_at=start + timedelta(seconds=2),
        **arch.columns(),
    )
    row.update(kw)
    return row


def _raw_rows(run_dir) -> int:
    """Rows physically on disk: compacted file + parts (duplicates included)."""
    t = ResultsTable(run_dir)
    files = t._part_paths() + ([t.path] if t.path.exists() else [])
    return sum(pq.read_metadata(p).num_rows for p in files)


# ------------------------------------------------------------------ arch columns


def test_rows_without_the_arch_columns_are_refused():
    # storage does not know the search space: the writer decodes (Arch.columns), storage stores
    row = make_row(_archs(1)[0])
    for f in DECODED_FIELDS:
        with pytest.raises(ValueError, match=f"^{f}: missing field"):
            R.validate_row({k: v for k, v in row.items() if k != f})
    with pytest.raises(ValueError, match="^fpn_ops: expected a list"):
        R.validate_row({**row, "fpn_ops": "def_conv_3x3"})


def test_columns_of_the_found_arch_by_hand():
    # The paper's found arch (Fig. 4 + released seq head):
    # FPN blocks [3,3,4,4,1][3,3,4,4,1][4,3,4,3,1][1,3,4,3,1][5,3,4,4,1][4,7,4,4,1][7,2,4,4,1]
    # ops 4 = def_conv_3x3, 3 = skip_connect: op pairs (4,4)(4,4)(4,3)(4,3)(4,4)(4,4)(4,4)
    #   -> 12 deformable, 2 skip; every agg is 1 = cat -> 7 concats.
    # head seq[5,1,5,0,4,4]: 5,5 = def_conv (2), 4,4 = skip (2), 6 layers, no aggs.
    a = space.PRESETS["nas-fcos"]
    d = a.columns()
    assert d["fpn_kind"] == "searched"
    assert d["fpn_inputs"] == [3, 3, 3, 3, 4, 3, 1, 3, 5, 3, 4, 7, 7, 2]
    assert d["fpn_ops"][:6] == ["def_conv_3x3"] * 5 + ["skip_connect"]
    assert (d["n_deform_fpn"], d["n_skip_fpn"], d["n_cat_fpn"]) == (12, 2, 7)
    assert d["fpn_aggs"] == ["cat"] * 7
    assert d["head_kind"] == "seq"
    assert d["head_ops"] == ["def_conv_3x3", "conv3x3", "def_conv_3x3", "conv1x1", "skip_connect", "skip_connect"]
    assert (d["n_deform_head"], d["n_skip_head"], d["n_cat_head"], d["head_layers"], d["share"]) == (2, 2, 0, 6, 0)
    assert d["head_aggs"] == [] and d["head_inputs"] == []

    d = space.PRESETS["fpn-fcos"].columns()
    assert (d["fpn_kind"], d["fpn_ops"], d["fpn_inputs"], d["head_kind"], d["head_ops"], d["head_layers"]) == ("fcos", [], [], "fcos", [], 4)


def test_columns_match_the_arch_on_random_archs():
    for a in _archs(40, seed=1) + list(space.PRESETS.values()):
        d = a.columns()
        assert set(d) == set(DECODED_FIELDS)
        assert R.arch_id_of(str(a)) == a.arch_id
        if a.fpn is not None:
            assert d["fpn_inputs"] == [i for b in a.fpn for i in (b.id1, b.id2)]
            assert d["fpn_ops"] == [space.FPN_OPS[o] for b in a.fpn for o in (b.op1, b.op2)]
            assert d["fpn_aggs"] == [space.AGGS[b.agg] for b in a.fpn]
        h = a.head
        assert d["head_kind"] == h.kind and d["head_layers"] == h.num_layers and d["share"] == a.share
        if h.kind == "dag":
            assert d["head_ops"] == [space.HEAD_OPS[h.ops[0]]] + [space.HEAD_OPS[o] for b in h.blocks for o in (b.op1, b.op2)]
            assert d["head_inputs"] == [i for b in h.blocks for i in (b.id1, b.id2)]
            assert d["head_aggs"] == [space.AGGS[b.agg] for b in h.blocks]
            assert d["n_cat_head"] == sum(b.agg == 1 for b in h.blocks)
        assert d["n_deform_fpn"] == d["fpn_ops"].count("def_conv_3x3")
        assert Arch.parse(str(a)).columns() == d  # the canonical string carries them all


def test_the_search_writes_each_row_with_its_arch_columns():
    # the one codec: rows made by the search loop carry Arch.columns() (storage no longer
    # re-decodes the string, so a writer that disagreed with it would go unnoticed there)
    from nasfcos.search.rows import make_row as search_row
    from nasfcos.search.rows import over_budget_row

    for a in _archs(5, seed=3) + list(space.PRESETS.values()):
        record = {k: v for k, v in make_row(a).items() if k not in DECODED_FIELDS and k not in ("step", "sample", "reward_used")}
        for row in (search_row(record, step=1, sample=2, penalty=PENALTY),
                    over_budget_row(a, params=1, macs=2, reason="too big", step=1, sample=3, penalty=PENALTY)):  # fmt: skip
            assert {f: row[f] for f in DECODED_FIELDS} == a.columns()
            assert R.validate_row(row)["arch_id"] == a.arch_id


@pytest.mark.parametrize(
    "text, token",
    [
        ("fpn=fcos;head=fcos", "missing field"),
        ("fpn=[0,0,0,0,0];head=fcos;share=0", "expected 7 blocks"),  # 1 block, not 7
        ("fpn=fcos;head=seq[6];share=0", "head op 0: 6"),
        ("fpn=fcos;head=fcos;share=5", "share: 5"),
        ("fpn=fcos;head=dag[0][2,0,0,0,0][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0];share=0", "head block 0 id1: 2"),
        ("fpn=fcos;head=dag[0][0,0,0,0,2][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0];share=0", "head block 0 agg"),
        ("fpn=[0,0,5,0,0][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0];head=fcos;share=0", "fpn block 0 op1"),
        ("fpn=[0,4,0,0,0][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0];head=fcos;share=0", "fpn block 0 id2"),
    ],
)
def test_a_bad_arch_string_never_reaches_a_row(text, token):
    # the codec that makes a row's columns parses the string first, naming the bad token
    with pytest.raises(space.ArchError) as e:
        Arch.parse(text).columns()
    assert token in str(e.value)


# ------------------------------------------------------------------ schema


def test_round_trip_lists_nan_and_timestamps(tmp_path):
    archs = _archs(3)
    rows = [
        make_row(archs[0], step=0, sample=0, reward=0.25),
        make_row(archs[1], step=0, sample=1, status="failed"),
        make_row(space.PRESETS["nas-fcos"], step=1, sample=0, reward=0.75),
    ]
    t = ResultsTable(tmp_path / "run")
    assert t.append(rows) == 3
    assert len(t) == 3 and t.contains(archs[1].arch_id) and not t.contains("0" * 12)
    assert not t.contains(archs[1].arch_id, ok_only=True) and t.contains(archs[0].arch_id, ok_only=True)

    df = t.read()
    assert list(df.columns) == SCHEMA.names
    assert list(df["arch_id"]) == [r["arch_id"] for r in rows]  # sorted by (step, sample)
    assert math.isnan(df["reward"].iloc[1]) and df["reward_used"].iloc[1] == PENALTY
    assert str(df["started_at"].dtype) == "datetime64[us, UTC]"
    assert list(df["fpn_ops"].iloc[2])[:2] == ["def_conv_3x3", "def_conv_3x3"]
    assert df["n_deform_fpn"].iloc[2] == 12

    for r in rows:  # get() returns exactly what went in
        got = t.get(r["arch_id"])
        expect = r
        assert set(got) == set(SCHEMA.names)
        for k, v in expect.items():
            if isinstance(v, float) and math.isnan(v):
                assert math.isnan(got[k]), k
            else:
                assert got[k] == v, k
        assert got["started_at"].utcoffset() == timedelta(0)
    assert t.get("0" * 12) is None

    before = t.read()
    assert t.compact() == 3
    assert not t._part_paths()
    pd.testing.assert_frame_equal(t.read(), before)
    pd.testing.assert_frame_equal(pd.read_parquet(t.path), before)


def test_timestamps_are_stored_in_utc(tmp_path):
    a = _archs(1)[0]
    plus2 = timezone(timedelta(hours=2))
    t = ResultsTable(tmp_path)
    t.append([make_row(a, started_at=datetime(2026, 3, 1, 12, tzinfo=plus2), finished_at=datetime(2026, 3, 1, 13, tzinfo=plus2))])
    got = t.get(a.arch_id)
    assert got["started_at"] == datetime(2026, 3, 1, 10, tzinfo=timezone.utc)
    assert t.read()["finished_at"].iloc[0] == pd.Timestamp("2026-03-01 11:00", tz="UTC")


def test_numpy_scalars_and_tuples_accepted(tmp_path):
    a = _archs(1)[0]
    row = make_row(a, step=np.int64(2), reward=np.float32(0.5), params=np.int32(3))
    row["fpn_ops"] = tuple(row["fpn_ops"])
    assert R.validate_row(row)["step"] == 2
    t = ResultsTable(tmp_path)
    assert t.append([row]) == 1 and t.get(a.arch_id)["reward"] == 0.5


_BAD = [
    ("step", "3"),
    ("step", True),
    ("step", 1.0),
    ("sample", -1),
    ("reward", "0.5"),
    ("params", 1.5),
    ("device", 0),
    ("arch_id", "abc"),
    ("arch", "nas-fcos"),
    ("status", "crashed"),
    ("reward_used", math.nan),
    ("reward", math.nan),  # status ok needs a finite reward
    ("error", "oops"),  # ok rows have error ''
    ("started_at", datetime(2026, 1, 1)),  # naive
    ("finished_at", "2026-01-01T00:00:00Z"),
    ("finished_at", pd.NaT),
    ("n_deform_fpn", 1.5),
    ("fpn_ops", "skip_connect"),
]


@pytest.mark.parametrize("field, value", _BAD, ids=[f"{f}={v!r}" for f, v in _BAD])
def test_validation_names_the_field(tmp_path, field, value):
    a = _archs(1)[0]
    t = ResultsTable(tmp_path)
    good = make_row(a, step=0, sample=0)
    bad = make_row(_archs(2)[1], step=0, sample=1)
    bad[field] = value
    with pytest.raises(ValueError, match=rf"^{field}: "):
        t.append([good, bad])
    assert len(t) == 0 and not t.parts_dir.exists()  # a bad row writes none of the batch


def test_validation_missing_unknown_and_failed_without_error(tmp_path):
    a = _archs(1)[0]
    for f in RECORD_FIELDS:
        row = make_row(a)
        del row[f]
        with pytest.raises(ValueError, match=rf"^{f}: missing"):
            R.validate_row(row)
    with pytest.raises(ValueError, match=r"^flops: unknown"):
        R.validate_row({**make_row(a), "flops": 1})
    with pytest.raises(ValueError, match=r"^error: "):
        R.validate_row(make_row(a, status="failed", error=""))
    with pytest.raises(ValueError, match=r"^rows: "):
        ResultsTable(tmp_path).append(make_row(a))  # a dict, not a list of dicts


# ------------------------------------------------------------------ dedup


def test_same_ok_arch_twice_keeps_the_first(tmp_path):
    a, b = _archs(2)
    t = ResultsTable(tmp_path)
    assert t.append([make_row(a, step=0, reward=0.1)]) == 1
    assert t.append([make_row(a, step=3, reward=0.9)]) == 0  # already scored: skipped
    assert t.append([make_row(b, step=1, reward=0.2), make_row(b, step=1, sample=1, reward=0.3)]) == 1  # within a batch
    t.compact()
    assert t.append([make_row(a, step=4, reward=0.9)]) == 0  # also against the compacted file
    df = t.read()
    assert list(df["arch_id"]) == [a.arch_id, b.arch_id]
    assert list(df["reward"]) == [0.1, 0.2]
    assert _raw_rows(tmp_path) == 2


def test_failed_then_ok_ok_wins_and_ok_is_never_replaced(tmp_path):
    a, b, c = _archs(3)
    t = ResultsTable(tmp_path)
    t.append([make_row(a, step=0, status="failed")])
    t.compact()
    assert t.get(a.arch_id)["status"] == "failed" and not t.contains(a.arch_id, ok_only=True)
    assert t.append([make_row(a, step=2, reward=0.4)]) == 1  # a failed arch may be retried
    assert t.append([make_row(a, step=3, status="failed")]) == 0  # ok is never replaced
    t.append([make_row(b, step=0, status="failed", error="first"), make_row(b, step=1, status="failed", error="second")])
    t.append([make_row(c, step=0, reward=0.3), make_row(c, step=1, status="failed")])
    for _ in range(2):  # the same answer before and after compaction
        assert len(t) == 3
        assert t.get(a.arch_id)["status"] == "ok" and t.get(a.arch_id)["reward"] == 0.4
        assert t.get(b.arch_id)["error"] == "second"  # no ok row: the latest attempt
        assert t.get(c.arch_id)["status"] == "ok"
        t.compact()
    assert len(pd.read_parquet(t.path)) == 3


def test_dedup_on_read_is_by_content_not_file_order(tmp_path):
    # Two ok rows of one arch that both reached disk (as after a crash, or a
    # writer without the lock): the one with the smaller (step, sample) wins,
    # whichever part file sorts first.
    a = _archs(1)[0]
    t = ResultsTable(tmp_path)
    late, early = make_row(a, step=5, reward=0.9), make_row(a, step=1, reward=0.1)
    R.write_parquet(R.rows_to_table([late]), t.parts_dir / "0-first.parquet")
    R.write_parquet(R.rows_to_table([early]), t.parts_dir / "1-second.parquet")
    assert len(t) == 1 and t.get(a.arch_id)["step"] == 1
    t.compact()
    assert _raw_rows(tmp_path) == 1 and t.get(a.arch_id)["step"] == 1


# ------------------------------------------------------------------ queries


def test_top_k_order_tie_break_and_file(tmp_path):
    archs = _archs(6, seed=3)
    rewards = [0.5, 0.9, 0.9, 0.1, 0.7]
    t = ResultsTable(tmp_path / "run")
    t.append([make_row(a, step=0, sample=i, reward=r) for i, (a, r) in enumerate(zip(archs[:5], rewards, strict=True))])
    t.append([make_row(archs[5], step=1, status="failed")])
    tied = sorted([archs[1].arch_id, archs[2].arch_id])
    top = t.top_k(3)
    assert list(top["arch_id"]) == tied + [archs[4].arch_id]
    assert list(top["reward"]) == [0.9, 0.9, 0.7] and list(top["rank"]) == [1, 2, 3]
    assert len(t.top_k(20)) == 5 and "failed" not in set(t.top_k(20)["status"])
    assert t.top_k(0).empty
    with pytest.raises(ValueError, match=r"^k: "):
        t.top_k(-1)

    out = tmp_path / "run" / "top_k.parquet"
    written = t.write_top_k(out, k=4)
    back = pd.read_parquet(out)
    pd.testing.assert_frame_equal(back, written)
    assert list(back["arch_id"]) == tied + [archs[4].arch_id, archs[0].arch_id]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_history(tmp_path):
    archs = _archs(7, seed=4)
    t = ResultsTable(tmp_path)
    t.append(
        [
            make_row(archs[0], step=0, sample=0, reward=0.2),
            make_row(archs[1], step=0, sample=1, reward=0.4),
            make_row(archs[2], step=1, sample=0, status="failed"),  # a step with no ok rows
            make_row(archs[3], step=2, sample=0, reward=0.3),
            make_row(archs[4], step=2, sample=1, reward=0.1),
            make_row(archs[5], step=2, sample=2, status="failed"),
            make_row(archs[6], step=3, sample=0, reward=0.6),
        ]
    )
    h = t.history()
    assert list(h.columns) == ["step", "n", "n_ok", "mean_reward", "max_reward", "best_reward", "mean_reward_used"]
    assert list(h["step"]) == [0, 1, 2, 3]
    assert list(h["n"]) == [2, 1, 3, 1] and list(h["n_ok"]) == [2, 0, 2, 1]
    np.testing.assert_allclose(h["mean_reward"], [0.3, np.nan, 0.2, 0.6])
    np.testing.assert_allclose(h["best_reward"], [0.4, 0.4, 0.4, 0.6])  # carried over the failed step
    # step 2: (0.3 + 0.1 + PENALTY) / 3
    np.testing.assert_allclose(h["mean_reward_used"], [0.3, PENALTY, (0.4 + PENALTY) / 3, 0.6])


def test_empty_table(tmp_path):
    t = ResultsTable(tmp_path / "run")
    assert len(t) == 0 and list(t.read().columns) == SCHEMA.names
    assert t.top_k().empty and t.history().empty and t.get("0" * 12) is None
    assert t.append([]) == 0
    assert t.compact() == 0
    assert pd.read_parquet(t.path).empty and list(pd.read_parquet(t.path).columns) == SCHEMA.names


def test_foreign_schema_file_is_named(tmp_path):
    t = ResultsTable(tmp_path)
    t.parts_dir.mkdir()
    R.write_parquet(pd.DataFrame({"arch_id": ["x"], "reward": [1.0]}), t.parts_dir / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: missing field 'arch'"):
        t.read()
    good = R.rows_to_table([make_row(_archs(1)[0])])
    bad = good.set_column(good.schema.get_field_index("step"), "step", pa.array(["x"]))
    R.write_parquet(bad, t.parts_dir / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: field 'step' is string, expected int64"):
        t.read()
    R.write_parquet(pd.DataFrame(good.to_pylist()), t.parts_dir / "bad.parquet")  # pandas' large_string is fine
    assert len(t) == 1


# ------------------------------------------------------------------ concurrency


def _append_worker(run_dir, rows, seed, start, out):
    """Append ``rows`` 1-3 at a time, compacting every few appends; report (written, t_first, t_last)."""
    rng = random.Random(seed)
    t = ResultsTable(run_dir)
    start.wait()
    written, i, n, t_first = 0, 0, 0, time.time()
    while i < len(rows):
        k = rng.randint(1, 3)
        written += t.append(rows[i : i + k])
        i, n = i + k, n + 1
        if n % rng.randint(2, 5) == 0:
            t.compact()
    out.put((written, t_first, time.time()))


def test_two_processes_appending_concurrently(tmp_path):
    archs = _archs(190, seed=5)
    shared = archs[180:]  # both processes score these 10: exactly one row each must survive
    rows_a = [make_row(a, step=i // 10, sample=i % 10, reward=i / 100) for i, a in enumerate(archs[:90] + shared)]
    rows_b = [make_row(a, step=i // 10, sample=i % 10, reward=-i / 100, device="cuda:1") for i, a in enumerate(archs[90:180] + shared)]
    random.Random(0).shuffle(rows_b)  # different order in the two processes

    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_append_worker, args=(str(tmp_path), rows, s, start, out)) for s, rows in ((1, rows_a), (2, rows_b))]
    for p in procs:
        p.start()
    start.set()
    res = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (wa, a0, a1), (wb, b0, b1) = res
    assert max(a0, b0) < min(a1, b1), "the two writers did not overlap in time"

    t = ResultsTable(tmp_path)
    df = t.read()
    assert len(df) == 190 and df["arch_id"].is_unique
    assert set(df["arch_id"]) == {a.arch_id for a in archs}
    assert wa + wb == 190  # append skipped the loser of each shared arch: no duplicate reached disk
    assert _raw_rows(tmp_path) == 190
    by_id = {r["arch_id"]: r for r in rows_a + rows_b}
    for a in archs[:180]:
        assert t.get(a.arch_id)["reward"] == by_id[a.arch_id]["reward"]
    t.compact()
    assert len(pd.read_parquet(t.path)) == 190 and not t._part_paths()


def _part_writer(run_dir, rows, start, out):
    start.wait()
    t = ResultsTable(run_dir)
    for i in range(0, len(rows), 2):
        t.write_part(rows[i : i + 2])
    out.put(len(rows))


def test_lock_free_writers_and_one_compactor_lose_nothing(tmp_path):
    # Tasks on other machines write parts without the lock (here: while this process
    # holds it) and the flow compacts meanwhile: every row survives, duplicates collapse.
    archs = _archs(120, seed=9)
    rows_a = [make_row(a, step=i // 8, sample=i % 8) for i, a in enumerate(archs[:70])]
    rows_b = [make_row(a, step=i // 8, sample=i % 8, device="cuda:1") for i, a in enumerate(archs[60:])]  # 10 shared
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_part_writer, args=(str(tmp_path), rows, start, out)) for rows in (rows_a, rows_b)]
    for p in procs:
        p.start()
    t = ResultsTable(tmp_path)
    with t._lock():  # the compaction lock held does not stop write_part
        start.set()
        assert sorted(out.get(timeout=60) for _ in procs) == [60, 70]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert _raw_rows(tmp_path) == 130 and len(t) == 120  # the shared archs are on disk twice, read once
    assert t.compact() == 120 and _raw_rows(tmp_path) == 120
    assert {r["arch_id"] for r in rows_a} <= set(pd.read_parquet(t.path).arch_id)


def test_compaction_keeps_parts_written_while_it_runs(tmp_path):
    archs = _archs(4, seed=10)
    t, late = ResultsTable(tmp_path), ResultsTable(tmp_path)
    t.write_part([make_row(archs[0]), make_row(archs[1], sample=1)])
    listed = t._part_paths
    # a task on another machine lands its part after the compactor listed the parts
    t._part_paths = lambda: (lambda parts: (late.write_part([make_row(archs[2], sample=2)]), parts)[1])(listed())
    assert t.compact() == 2
    del t._part_paths
    assert len(t._part_paths()) == 1 and len(t) == 3
    assert t.compact() == 3


def test_reader_racing_a_compaction_sees_every_row(tmp_path):
    # Reader lists the parts, then a whole compaction runs (parts merged and
    # deleted) before it reads them: it must still return every row.
    archs = _archs(6, seed=6)
    writer, reader = ResultsTable(tmp_path), ResultsTable(tmp_path)
    for i, a in enumerate(archs):
        writer.append([make_row(a, step=i)])
    listed = reader._part_paths
    reader._part_paths = lambda: (lambda parts: (writer.compact(), parts)[1])(listed())
    assert len(reader.read()) == 6 and not writer._part_paths()


# ------------------------------------------------------------------ crash safety


def _two_step_table(tmp_path):
    """A compacted table of 3 rows plus 3 parts (one a failed row later retried ok)."""
    archs = _archs(5, seed=7)
    t = ResultsTable(tmp_path)
    t.append([make_row(archs[0], step=0), make_row(archs[1], step=0, sample=1, status="failed")])
    t.append([make_row(archs[2], step=0, sample=2)])
    t.compact()
    t.append([make_row(archs[1], step=1, reward=0.8)])
    t.append([make_row(archs[3], step=1, sample=1)])
    t.append([make_row(archs[4], step=1, sample=2, status="failed")])
    return t, t.read()


def _killed_at_rename(monkeypatch, name: str = "") -> None:
    """The writer of a file named ``name`` (any, when empty) dies after writing its temp file,
    before the rename: the rename raises and nothing after it runs (the temp file stays)."""
    real_replace, real_unlink = os.replace, os.unlink

    def replace(src, dst):
        if Path(dst).name == name or not name:
            raise KeyboardInterrupt("killed after writing the temp file")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", lambda p: None if Path(p).name.startswith(".tmp-") else real_unlink(p))


def test_crash_before_rename_loses_nothing(tmp_path, monkeypatch):
    t, expect = _two_step_table(tmp_path)
    with monkeypatch.context() as m:
        _killed_at_rename(m, "results.parquet")
        with pytest.raises(KeyboardInterrupt):
            t.compact()
    (orphan,) = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-results.parquet")]
    pd.testing.assert_frame_equal(t.read(), expect)
    assert t.compact() == 5
    assert orphan.exists()  # young: a lock-free writer on another machine may own it
    for p in tmp_path.glob(".tmp-*"):  # its own and its compaction lock's temp file, once old
        _age(p)
    assert t.compact() == 5
    pd.testing.assert_frame_equal(pd.read_parquet(t.path), expect)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] and not t._part_paths()


@pytest.mark.parametrize("deleted_before_crash", [0, 2])
def test_crash_after_rename_duplicates_nothing(tmp_path, monkeypatch, deleted_before_crash):
    t, expect = _two_step_table(tmp_path)
    real_unlink = R._unlink
    calls = []

    def die_while_deleting(path):
        if len(calls) == deleted_before_crash:
            raise KeyboardInterrupt("killed while deleting merged parts")
        calls.append(path)
        real_unlink(path)

    monkeypatch.setattr(R, "_unlink", die_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        t.compact()
    monkeypatch.setattr(R, "_unlink", real_unlink)
    assert len(t._part_paths()) == 3 - deleted_before_crash
    assert _raw_rows(tmp_path) > 5  # rows really are on disk twice now
    pd.testing.assert_frame_equal(t.read(), expect)
    assert t.get(expect["arch_id"].iloc[1])["status"] == "ok"  # the retried arch: ok, once
    assert t.append([make_row(_archs(5, seed=7)[3], step=9)]) == 0  # still known as done
    assert t.compact() == 5
    assert _raw_rows(tmp_path) == 5 and not t._part_paths()
    pd.testing.assert_frame_equal(pd.read_parquet(t.path), expect)


def test_crash_during_append_writes_nothing(tmp_path, monkeypatch):
    t, expect = _two_step_table(tmp_path)
    with monkeypatch.context() as m:
        _killed_at_rename(m)
        with pytest.raises(KeyboardInterrupt):
            t.append([make_row(_archs(6, seed=8)[0], step=2)])
    (orphan,) = [p for p in t.parts_dir.iterdir() if p.name.startswith(".tmp-")]  # ignored by readers
    pd.testing.assert_frame_equal(t.read(), expect)
    _age(orphan)
    t.compact()
    assert not [p for p in t.parts_dir.iterdir() if p.name.startswith(".tmp-")]


def _age(path) -> None:
    """Make a temp file look older than any live writer's."""
    old = time.time() - atomicio.ORPHAN_AGE_S - 60
    os.utime(path, (old, old))


def _die_after_rename_worker(run_dir):
    import storage.results as results

    results._delete_parts = lambda parts: os._exit(3)  # process dies holding the lock
    results.ResultsTable(run_dir).compact()


def test_process_killed_mid_compaction(tmp_path):
    t, expect = _two_step_table(tmp_path)
    p = mp.get_context("spawn").Process(target=_die_after_rename_worker, args=(str(tmp_path),))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 3
    # The dead process's compaction lock is still there, naming it; the next holder breaks it ...
    assert json.loads(t.lock_path.read_text())["pid"] == p.pid
    with t._lock():
        assert json.loads(t.lock_path.read_text())["pid"] == os.getpid()
    # ... its merged file was renamed in, the parts are still there, and nothing doubles.
    assert _raw_rows(tmp_path) > 5
    pd.testing.assert_frame_equal(t.read(), expect)
    assert t.compact() == 5
    pd.testing.assert_frame_equal(pd.read_parquet(t.path), expect)


def test_a_damaged_part_file_is_named_by_readers_and_quarantined_by_the_compaction(tmp_path, caplog):
    """Today's failure: ArrowInvalid without the file's name, and every later append failed.
    Readers never move a file (issue #26): they name it and leave it out; the owner's
    compaction moves it to quarantine."""
    import logging

    table = ResultsTable(tmp_path)
    rows = [make_row(a, sample=i) for i, a in enumerate(_archs(3))]
    for r in rows:
        table.write_part([r])
    parts = sorted((tmp_path / "results.parts").glob("*.parquet"))
    damaged = parts[1]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\x00" * 16  # a flipped run of bytes mid-file
    damaged.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="storage.results"):
        assert len(table) == 2  # the other rows read; the damaged one is left out
    assert damaged.exists() and not (tmp_path / "quarantine").exists()
    assert any(damaged.name in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert table.append([rows[1]]) == 1  # its arch counts as not evaluated: evaluated and appended again
    assert table.compact() == 3 and sorted(table.read().arch_id) == sorted(r["arch_id"] for r in rows)
    moved = list((tmp_path / "quarantine").iterdir())
    assert len(moved) == 1 and moved[0].name.endswith(damaged.name) and not damaged.exists()
    # the compacted table itself damaged (e.g. truncated): quarantined by the compaction, later writes go on
    (tmp_path / "results.parquet").write_bytes((tmp_path / "results.parquet").read_bytes()[:100])
    assert len(table) == 0 and table.append([rows[0]]) == 1 and table.compact() == 1
    assert len(list((tmp_path / "quarantine").iterdir())) == 2


def test_a_row_check_reads_only_the_parts_that_may_hold_its_arch(tmp_path, monkeypatch):
    """A worker's row check (two per evaluation) read every part of every worker: O(workers)
    reads per arch, 55 % of a Dask worker's CPU at 128 slots (py-spy, issue #27). A part of
    one arch is named for it; parts of several archs, of older names and the compacted file
    are still read."""
    a, b, c, d = _archs(4)
    t = ResultsTable(tmp_path)
    for x in (a, b):
        t.write_part([make_row(x)])
    t.write_part([make_row(c), make_row(d, sample=1)])  # two archs: named for neither
    named = {R._part_arch(p.name) for p in t._part_paths()}
    assert named == {a.arch_id, b.arch_id, None}
    read: list[str] = []
    real = ResultsTable._read_for_reader
    monkeypatch.setattr(ResultsTable, "_read_for_reader", lambda self, path: (read.append(path.name), real(self, path))[1])
    reader = ResultsTable(tmp_path)
    assert reader.get(a.arch_id)["arch_id"] == a.arch_id and len(read) == 2  # a's part and the two-arch part
    assert R._part_arch(read[0]) in (a.arch_id, None) and R._part_arch(read[1]) in (a.arch_id, None)
    assert reader.get(d.arch_id)["sample"] == 1 and reader.get(b.arch_id) is not None and len(read) == 3  # b's part, once
    assert len(reader) == 4 and len(read) == 3  # a full read finds every part cached
    assert t.compact() == 4 and reader.get(c.arch_id) is not None and reader.get("0123456789ab") is None
    assert read[-1] == "results.parquet" and len(read) == 4


# ---------------------------------------------------------------- schema 2: fidelities, over_budget


def test_rows_of_more_rungs_replace_fewer_and_a_failed_top_rung_wins(tmp_path):
    """Successive halving writes a row per rung (each with the rewards below): the table keeps
    the row of the most rungs, in any file order and across compaction; a failed higher rung
    replaces an ok lower one; append skips a row of as many rungs as an ok one it has."""
    a, b = _archs(2)
    r0 = make_row(a, reward=-2.0, epochs=3, rung_epochs=[3], rung_rewards=[-2.0])
    r1 = make_row(a, reward=-1.5, epochs=7, rung_epochs=[3, 7], rung_rewards=[-2.0, -1.5])
    t = ResultsTable(tmp_path)
    t.write_part([r1])
    t.write_part([r0])  # a late lower-rung row (a retried task) does not win
    assert t.get(a.arch_id)["rung_rewards"] == [-2.0, -1.5] and t.compact() == 1 and t.get(a.arch_id)["epochs"] == 7
    assert t.append([r0]) == 0 and t.append([make_row(a, reward=-1.0, epochs=15, rung_epochs=[3, 7, 15], rung_rewards=[-2.0, -1.5, -1.0])]) == 1
    f0 = make_row(b, reward=-2.2, epochs=3, rung_epochs=[3], rung_rewards=[-2.2])
    f1 = make_row(b, status="failed", epochs=7, rung_epochs=[3, 7], rung_rewards=[-2.2, math.nan])
    t.append([f0, f1])
    row = t.get(b.arch_id)
    assert row["status"] == "failed" and row["reward_used"] == PENALTY and row["rung_rewards"][0] == -2.2 and math.isnan(row["rung_rewards"][1])
    assert t.top_k(2).arch_id.tolist() == [a.arch_id]
    with pytest.raises(ValueError, match="rung_rewards: 1 rewards for 2 rung_epochs"):
        t.append([make_row(b, epochs=7, rung_epochs=[3, 7], rung_rewards=[-2.0])])
    with pytest.raises(ValueError, match="must increase and end at epochs"):
        t.append([make_row(b, epochs=7, rung_epochs=[7, 3], rung_rewards=[-2.0, -2.0])])
    with pytest.raises(ValueError, match="the last .* must be the reward"):
        t.append([make_row(b, reward=-1.0, epochs=7, rung_epochs=[3, 7], rung_rewards=[-2.0, -2.0])])


def test_top_k_ranks_archs_of_more_rungs_first(tmp_path):
    a, b, c = _archs(3)
    t = ResultsTable(tmp_path)
    t.append([
        make_row(a, reward=-0.5, epochs=1, rung_epochs=[1], rung_rewards=[-0.5]),  # a short run's loss is not comparable
        make_row(b, reward=-1.0, epochs=3, rung_epochs=[1, 3], rung_rewards=[-1.2, -1.0]),
        make_row(c, reward=-0.9, epochs=3, rung_epochs=[1, 3], rung_rewards=[-1.1, -0.9]),
    ])  # fmt: skip
    assert t.top_k(3).arch_id.tolist() == [c.arch_id, b.arch_id, a.arch_id]


def test_a_schema_1_file_reads_with_default_fidelity_columns(tmp_path):
    """Run dirs written before schema 2 keep working: their rows get epochs -1 and empty rung
    lists, count as one rung, and a new row of the same arch does not replace an ok one."""
    a, b = _archs(2)
    t = ResultsTable(tmp_path)
    t.append([make_row(a, reward=-2.0)])
    t.compact()
    old = pq.read_table(t.path).drop_columns(["epochs", "rung_epochs", "rung_rewards"])
    pq.write_table(old, t.path)
    row = t.get(a.arch_id)
    assert (row["epochs"], row["rung_epochs"], row["rung_rewards"]) == (-1, [], [])
    assert t.append([make_row(a, reward=-1.0, epochs=15, rung_epochs=[15], rung_rewards=[-1.0])]) == 0
    assert t.append([make_row(b, reward=-1.0)]) == 1 and t.compact() == 2 and t.get(a.arch_id)["reward"] == -2.0


def test_over_budget_rows_need_a_reason_and_stay_out_of_history(tmp_path):
    a, b = _archs(2)
    t = ResultsTable(tmp_path)
    with pytest.raises(ValueError, match="error: a failed row needs an error message"):
        t.append([make_row(a, status="over_budget", error="")])
    t.append([make_row(a, status="over_budget", error="decoder MACs 9 > search.max_decoder_macs 5"), make_row(b, reward=-1.0)])
    assert t.get(a.arch_id)["status"] == "over_budget" and t.history().n.tolist() == [1] and t.count("over_budget") == 1
    assert t.top_k(5).arch_id.tolist() == [b.arch_id]
