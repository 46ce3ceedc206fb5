"""train-full as jobs on a work pool (issue #29), on a real Prefect server with a real
process worker: each arch a ``train-arch`` flow run of its own, two side by side; a job
SIGKILLed mid-training is submitted again and resumes from its checkpoint; the stage's
own process SIGKILLed and started again re-attaches to the running job; a job created
by a stage that died before naming it is found again by its idempotency key."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import finish, pipeline_process, train_full_stage

pytest.importorskip("prefect")

ROOT = Path(__file__).resolve().parents[1]
POOL, DEPLOYMENT = "jobs-test", "train-arch/jobs-test"
FPN = "fpn-fcos"
BN = "fpn=[3,3,0,0,1][3,3,0,0,1][4,3,0,3,1][1,3,0,3,1][5,3,0,0,1][4,7,0,0,1][7,2,0,0,1];head=fcos;share=0"


@pytest.fixture(scope="module")
def pool(prefect_server, tmp_path_factory):
    """The ``train-arch`` deployment on a process work pool and a worker polling it (a
    process of its own, as `make demo` starts one); jobs read fault rules from ``faults``."""
    from prefect.settings import PREFECT_API_URL

    from flows.train_arch import train_arch

    tmp = tmp_path_factory.mktemp("pool")
    faults = tmp / "faults"
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "nasfcos,storage",
        "NASFCOS_FAULT_FILE": str(faults),
    }
    env.pop("NASFCOS_FAULT", None)
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
        env=env, stdout=open(tmp / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: _pool_exists(POOL), 120, "the worker did not create its pool")
        train_arch.from_source(source=str(ROOT), entrypoint="flows/train_arch.py:train_arch").deploy(
            name=POOL, work_pool_name=POOL, build=False, push=False, print_next_steps=False, ignore_warnings=True
        )
        yield {"faults": faults, "env": env, "log": tmp / "worker.log"}
    finally:
        os.killpg(worker.pid, signal.SIGINT)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)


def _wait_for(ok, seconds: float, what: str):
    t0 = time.monotonic()
    while not (value := ok()):
        assert time.monotonic() - t0 < seconds, what
        time.sleep(0.5)
    return value


def _pool_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as c:
        try:
            c.read_work_pool(name)
        except ObjectNotFound:
            return False
    return True


def _overrides(run_id: str, runs: Path, **extra) -> dict:
    return {
        "run_id": run_id, "runs_dir": str(runs), "train_full.jobs": DEPLOYMENT, "train_full.num_archs": 2, "train_full.baselines": [],
        "train_full.init_from_finetuned": False, "train_full.iterations": 8, "train_full.steps": [6], "train_full.checkpoint_every": 2,
        "execution.devices": ["cpu", "cpu"], "execution.report": False, **extra,
    }  # fmt: skip


def _prepare(overrides: dict, archs: list[str]) -> dict[str, str]:
    """A run directory holding what train-full reads: the data and top_k.parquet; {arch: arch_id}."""
    from flows.config import load_config
    from flows.inputs import ensure_data
    from nasfcos.arch import resolve
    from storage.run_dir import RunDir

    cfg = load_config("tiny", overrides)
    run = RunDir.at(cfg.runs_dir, cfg.run_id)
    ensure_data(cfg, run)
    ids = {a: resolve(a).arch_id for a in archs}
    pd.DataFrame({"arch_id": list(ids.values()), "arch": [str(resolve(a)) for a in archs]}).to_parquet(run.top_k)
    return ids


def _jobs(run_id: str, arch_id: str) -> list:
    """The arch's train-arch flow runs, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"run:{run_id}", f"arch:{arch_id}"])), sort=FlowRunSort.EXPECTED_START_TIME_ASC)
    return sorted(runs, key=lambda r: r.parameters.get("attempt", 0))


def _logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as c:
        return "\n".join(log.message for log in c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))


def test_two_jobs_side_by_side_and_a_killed_job_resumes_from_its_checkpoint(pool, tmp_path):
    """Two archs, two devices: two flow runs at once. The BN arch's job is SIGKILLed at
    iteration 5 (checkpoint at 4): the worker reports it crashed, the stage submits attempt 1,
    which starts after the killed one ended and resumes at 4 (1 iteration lost, <= the
    checkpoint interval); the other arch has one job."""
    from flows.config import load_config
    from flows.stages import portable
    from flows.train_full import train_full
    from nasfcos.engine.checkpoint import load_checkpoint

    overrides = _overrides("jobs-kill", tmp_path)
    ids = _prepare(overrides, [FPN, BN])
    once = tmp_path / "killed-once"
    pool["faults"].write_text(f"train:{ids[BN]}:5:rank0=kill:{once}")
    try:
        out = train_full(portable(load_config("tiny", overrides)))
    finally:
        pool["faults"].unlink()
    assert once.exists()
    assert [(t["arch_id"], t["status"], t["iteration"]) for t in out["trained"]] == [(ids[FPN], "ok", 8), (ids[BN], "ok", 8)]
    fpn, bn = _jobs("jobs-kill", ids[FPN]), _jobs("jobs-kill", ids[BN])
    assert [r.state_name for r in fpn] == ["Completed"]
    assert [r.state_name for r in bn] == ["Crashed", "Completed"], [(r.state_name, r.state.message) for r in bn]
    # side by side: both submitted before either ended (when each process starts is the loaded worker's business)
    assert fpn[0].created < bn[0].end_time and bn[0].created < fpn[0].end_time
    assert bn[1].start_time >= bn[0].end_time  # never two jobs of one arch at once
    # its log says where it resumed (Prefect ingests a finished process's last logs a moment later)
    _wait_for(lambda: "at iteration 4/8" in _logs(bn[1].id), 60, f"attempt 1 did not log its resume: {_logs(bn[1].id)[-500:]}")
    assert "resuming" in _logs(bn[1].id)
    run = tmp_path / "jobs-kill"
    assert load_checkpoint(run / "full" / ids[BN] / "checkpoint.pt")["iteration"] == 8
    assert {r.parameters["devices"][0] for r in (fpn[0], bn[0])} == {"cpu"}  # a group each ("cpu" twice)
    assert _latest_progress(f"jobs-kill-train-{ids[FPN]}-progress") == 100.0  # each job's own progress in the UI


def _latest_progress(key: str) -> float:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        (art,) = c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return float(art.data)


def test_a_restarted_stage_finds_its_job_again_and_waits_for_it(pool, tmp_path):
    """A job created by a stage that died before naming it (its idempotency key made here) is
    the one the next stage submits; that stage is SIGKILLed while the job trains (held at
    iteration 3), the next one re-attaches to the running job (adopting it with its own epoch),
    the job is let go and finishes: one flow run for the arch in all."""
    from prefect.deployments import run_deployment

    from flows.config import load_config
    from flows.stages import portable
    from flows.train_jobs import key
    from nasfcos.arch import resolve
    from storage.run_dir import RunDir
    from storage.run_epoch import current
    from storage.train_jobs import read_job

    overrides = _overrides("jobs-attach", tmp_path, **{"train_full.num_archs": 1})
    ids = _prepare(overrides, [FPN])
    cfg = load_config("tiny", overrides)
    arch_dir = tmp_path / "jobs-attach" / "full" / ids[FPN]
    hold = tmp_path / "hold"
    pool["faults"].write_text(f"train:{ids[FPN]}:3:rank0=wait:{hold}")
    first = run_deployment(  # what a stage that died right after creating its job left
        DEPLOYMENT,
        parameters={"config": portable(cfg), "arch": str(resolve(FPN)), "arch_id": ids[FPN], "kind": "searched", "devices": ["cpu"], "attempt": 0},
        timeout=0, idempotency_key=key(cfg, RunDir.at(cfg.runs_dir, cfg.run_id), ids[FPN], 0), tags=["run:jobs-attach", f"arch:{ids[FPN]}"], as_subflow=False,
    )  # fmt: skip
    env = {**pool["env"], "NASFCOS_FAULT_FILE": str(pool["faults"])}
    try:
        stage = pipeline_process(overrides, env, tmp_path / "stage1.log", entry=train_full_stage)
        _wait_for(lambda: Path(f"{hold}.reached").exists(), 180, "the job did not reach iteration 3")
        epoch = current(tmp_path / "jobs-attach")
        assert read_job(arch_dir)["flow_run_id"] == str(first.id) and read_job(arch_dir)["epoch"] == epoch
        stage.kill()
        stage.join()
        again = pipeline_process(overrides, env, tmp_path / "stage2.log", entry=train_full_stage)
        _wait_for(lambda: read_job(arch_dir)["epoch"] > epoch, 180, "the restarted stage did not adopt the job")
        hold.touch()
        assert finish(again, 240) == 0, (tmp_path / "stage2.log").read_text()[-3000:]
    finally:
        hold.touch()
        pool["faults"].unlink(missing_ok=True)
    jobs = _jobs("jobs-attach", ids[FPN])
    assert [(str(r.id), r.state_name) for r in jobs] == [(str(first.id), "Completed")]
    assert "re-attached to its running job" in (tmp_path / "stage2.log").read_text()
    board = pd.read_json(tmp_path / "jobs-attach" / "full" / ids[FPN] / "trained.json", typ="series")
    assert board["status"] == "ok" and board["iteration"] == 8 and board["job"] == str(first.id)


def test_a_replaced_job_stops_at_its_next_log_line_and_an_older_stage_cannot_rename_it(synthetic_small, tmp_path):
    """JobFence in training: the job named in job.json trains; once job.json names another,
    it raises Fenced at its next log line, before the checkpoint after it. write_job refuses a
    stage of an older run epoch. The run directory's jobs id is made once."""
    from nasfcos.data import COCODetection, build_transforms
    from nasfcos.engine.train import TrainConfig, train
    from nasfcos.model.detector import DetectorSpec
    from storage.run_epoch import Fenced
    from storage.train_jobs import JobFence, jobs_uid, write_job

    arch_dir = tmp_path / "full" / "a"
    write_job(arch_dir, flow_run_id="old", attempt=0, key="k0", devices=["cpu"], epoch=1)
    fence = JobFence(str(arch_dir), "old")

    def replaced_at_3(it: int) -> None:
        if it >= 3:  # the stage submitted attempt 1 while this job still ran
            write_job(arch_dir, flow_run_id="new", attempt=1, key="k1", devices=["cpu"], epoch=2)
        fence(it)

    ds = COCODetection(synthetic_small["train_json"], synthetic_small["image_root"], transforms=build_transforms(train=True, min_size=64, max_size=96, crop=64))
    cfg = TrainConfig(iterations=8, batch_size=2, base_lr=0.01, warmup_iters=1, steps=(6,), checkpoint_every=4, log_every=1, num_workers=0)
    with pytest.raises(Fenced, match="flow run new \\(attempt 1\\) trains this arch now; job old stops at iteration 3"):
        train(DetectorSpec(num_classes=3, backbone="tiny", width=32), ds, cfg, arch_dir, fence=replaced_at_3)
    assert not (arch_dir / "checkpoint.pt").exists()  # stopped before its first checkpoint (iteration 4)
    with pytest.raises(Fenced, match="newer than this stage's 1"):
        write_job(arch_dir, flow_run_id="zombie", attempt=2, key="k2", devices=["cpu"], epoch=1)
    assert jobs_uid(tmp_path / "full") == jobs_uid(tmp_path / "full") and len(jobs_uid(tmp_path / "full")) == 12
