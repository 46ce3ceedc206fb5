"""Data-parallel training of one detector (NAS-FCOS §4.2 trains on 8 GPUs) through
``torchrun`` (``torch.distributed.run``): one code path for one machine and several,
NCCL on GPU, gloo on CPU.

Two ways in, one rank code (:func:`main`):

- :func:`train_on_devices` (the pipeline's finetune and train-full, ``nasfcos train
  --nproc N``): N devices of this machine. One device trains in this process; more write
  the job (``<out>/job.pkl``: spec, dataset, settings) and run ``torchrun --standalone
  --nproc-per-node N -m nasfcos.engine.distributed <out>/job.pkl``.
- A ``train-arch`` job on several machines (``NASFCOS_NODES``: a Kubernetes Indexed Job,
  a SLURM allocation; :func:`_launch`, ``deployments/torchrun-node.sh``).
- By hand, on several machines sharing the output directory, the same job under
  torchrun's rendezvous (docs/user-guide.md, "Data-parallel full training")::

      torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
          --max-restarts 3 -m nasfcos.engine.distributed runs/<id>/full/<arch_id>/job.pkl

What stays equal to one process, and why:

- **Batch and order.** The global batch is ``cfg.batch_size``; rank r takes the r-th
  contiguous share of every global batch of the same (seed, position) order
  (``PositionSampler``), so a killed run resumes exactly, on any number of ranks
  that divides the batch.
- **Loss.** Each rank computes FCOS's loss sums, the normalisers (positives,
  positives + images, centerness-weight sum) are summed over ranks, and the local loss
  is multiplied by N, so DDP's gradient *mean* is the one-process gradient (the FCOS
  reference code reduces its normalisers across GPUs too). Images are padded per rank,
  as in the reference: equal to one process exactly when a batch's images share a size.
- **BatchNorm.** Trainable BatchNorm (the searched FPN ops) becomes SyncBatchNorm on
  CUDA. torch's SyncBatchNorm refuses CPU tensors, so CPU ranks (tests) keep per-rank
  statistics; frozen backbone BN (``FrozenBatchNorm2d``) is left alone.
- **Checkpoints.** Only rank 0 writes them, atomically; every rank resumes from the same,
  so a group torchrun restarts after losing a rank or a node (``--max-restarts``) goes on
  from the last checkpoint.

**Failures across ranks.** A rank that raises writes a record (``<out>/ranks/``: rank,
host, error, class) before it exits. An out-of-memory error or a non-finite loss on any
rank is the arch's: re-raised here as that error, naming the rank (train-full makes it a
``failed`` row); a restarted group that finds such a record stops at once instead of
failing the same way again. A rank or node lost without one (killed, a peer's broken
connection) is the machine's: torchrun restarts the group, then an
``InfrastructureError`` lets the stage retry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

import atomicio
from nasfcos.engine import train as training  # train() looked up at call time: tests replace it
from nasfcos.engine.checkpoint import CHECKPOINT, load_checkpoint
from nasfcos.engine.train import TrainConfig, TrainResult
from nasfcos.errors import InfrastructureError, is_infrastructure, one_line
from nasfcos.model.detector import DetectorSpec

JOB = "job.pkl"
RANKS = "ranks"  # the ranks' error records, under the output directory
LAUNCHER_PID = "NASFCOS_LAUNCHER_PID"  # set by train_on_devices: ranks end when it is gone
# set by a work pool's job (deployments/k8s, deployments/slurm): an arch trained on several machines
NODES, RDZV_ENDPOINT, LAUNCHER = "NASFCOS_NODES", "NASFCOS_RDZV_ENDPOINT", "NASFCOS_LAUNCHER"
RDZV_ID, JOB_FILE = "NASFCOS_RDZV_ID", "NASFCOS_JOB_FILE"
# errors that are the arch's, re-raised as themselves (train-full: a failed row)
_ARCH_ERRORS = {e.__name__: e for e in (torch.OutOfMemoryError, FloatingPointError)}
# errors that mean bad input, re-raised as themselves (one line in the CLI)
_USER_ERRORS = {e.__name__: e for e in (ValueError, FileNotFoundError)}
_RERAISED = {**_ARCH_ERRORS, **_USER_ERRORS}


def rank_devices(device: str, nproc: int) -> list[str]:
    """The device of each of ``nproc`` ranks: ``cpu`` N times, or ``cuda``/``cuda:K`` ->
    cuda:K..K+N-1 (``nasfcos train --nproc N --device ...``)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    d = torch.device(device)
    if d.type == "cpu":
        return ["cpu"] * nproc
    if d.type == "cuda":
        first = d.index or 0
        return [f"cuda:{first + i}" for i in range(nproc)]
    raise ValueError(f"--device {device}: distributed training runs on cpu or cuda")


def backend_for(devices: Sequence[str]) -> str:
    """NCCL for distinct GPUs, gloo for CPU processes; anything else is an error."""
    kinds = {torch.device(d).type for d in devices}
    if kinds == {"cpu"}:
        return "gloo"
    if kinds == {"cuda"}:
        if len({torch.device(d).index or 0 for d in devices}) != len(devices):
            raise ValueError(f"devices {list(devices)}: each rank needs its own GPU")
        return "nccl"
    raise ValueError(f"devices {list(devices)}: all cpu or all cuda:N")


def write_job(spec: DetectorSpec, dataset: Dataset, cfg: TrainConfig, out_dir: str | Path, *, device: str, name: str = JOB, **kwargs: Any) -> Path:
    """``<out_dir>/job.pkl``: what every rank trains (``device``: ``cpu`` or ``cuda``;
    ``kwargs``: ``train``'s). A pickle: the dataset object goes whole, as it would to a
    spawned rank; read it only from an output directory you wrote."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = {"version": 1, "spec": spec, "dataset": dataset, "cfg": cfg, "device": torch.device(device).type, "kwargs": kwargs}
    atomicio.write_bytes(out / name, pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
    return out / name


def read_job(path: str | Path) -> dict:
    """A job written by :func:`write_job`; a missing or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training job there (train_on_devices or a train-full attempt writes <out>/{JOB})")
    try:
        job = pickle.loads(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise ValueError(f"{path}: cannot read the training job ({one_line(e)})") from None
    if not isinstance(job, dict) or job.get("version") != 1:
        raise ValueError(f"{path}: not a nasfcos training job (version 1)")
    return job


def train_on_devices(
    spec: DetectorSpec,
    dataset: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    devices: Sequence[str],
    max_restarts: int = 0,
    nodes: int = 1,
    launcher: str = "",
    **kwargs: Any,
) -> TrainResult:
    """``nasfcos.engine.train.train`` on ``devices`` of this machine, one rank each (one
    device: in this process), through torchrun; a group that loses a rank is restarted up
    to ``max_restarts`` times and resumes from the last checkpoint.

    ``kwargs`` are ``train``'s (``backbone_weights``, ``init_checkpoint``, ``meta``,
    ``stop_at``, ``fence``). The result is read back from rank 0's checkpoint. ``nodes`` > 1:
    this machine is one of several meeting at ``NASFCOS_RDZV_ENDPOINT``; ``launcher``: a
    command that, given the job file, starts every node (both set by a ``train-arch`` job
    from its pool's environment, :func:`launch_from_env`).
    """
    devices = list(devices)
    if len(devices) == 1 and nodes == 1 and not launcher:
        return training.train(spec, dataset, cfg, out_dir, device=devices[0], **kwargs)
    backend_for(devices)
    if cfg.batch_size % (nodes * len(devices)):
        raise ValueError(
            f"batch size {cfg.batch_size} is not divisible by the {nodes * len(devices)} devices ({nodes} node(s) x {len(devices)}: --nproc / train_full.devices_per_arch)"
        )
    out = Path(out_dir)
    # a pool's job names its file (NASFCOS_JOB_FILE, one per attempt): another node never reads an earlier attempt's
    named = os.environ.get(JOB_FILE)
    name = Path(named).name if named and Path(named).parent.resolve() == out.resolve() else JOB
    job = write_job(spec, dataset, cfg, out, device=devices[0], name=name, **kwargs, log_level=logging.getLogger().getEffectiveLevel())
    shutil.rmtree(out / RANKS, ignore_errors=True)  # an earlier launch's records are not this one's
    cmd, env = _launch(job, len(devices), nodes, launcher, max_restarts)
    # ranks on this machine end when this process is gone; a launcher's (sbatch) run elsewhere, where this pid means nothing
    env = {**os.environ, **env, **_visible(devices), **({} if launcher else {LAUNCHER_PID: str(os.getpid())})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own group: stopped with us (below)
    try:
        while (rc := proc.poll()) is None:  # polled: a task's timeout or cancel (an exception in this thread) gets through
            if not threading.main_thread().is_alive():  # the flow's main thread ended (Ctrl-C): do not train on unseen
                raise InfrastructureError("data-parallel training stopped: its process is ending")
            time.sleep(0.5)
    except BaseException:
        _stop(proc)
        raise
    if rc:
        error = _failure(out / RANKS, rc)
        if not isinstance(error, InfrastructureError):
            job.unlink(missing_ok=True)  # it would fail the same way; a COCO dataset pickles to hundreds of MB
        raise error  # a lost rank's job stays: torchrun it by hand, or the retry writes it again
    job.unlink(missing_ok=True)
    ckpt_path = out / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path)
    return TrainResult(checkpoint=ckpt_path, iteration=int(ckpt["iteration"]), seconds=time.perf_counter() - t0, last_losses=ckpt["losses"])


def launch_from_env() -> dict[str, Any]:
    """``nodes`` and ``launcher`` of :func:`train_on_devices` as a work pool's job sets them
    (``NASFCOS_NODES``, ``NASFCOS_LAUNCHER``); read by the ``train-arch`` job only, so that a
    variable left in a machine's environment never turns other trainings multi-node."""
    return {"nodes": int(os.environ.get(NODES) or 1), "launcher": os.environ.get(LAUNCHER, "")}


def _launch(job: Path, nproc: int, nodes: int, launcher: str, max_restarts: int) -> tuple[list[str], dict[str, str]]:
    """The command that starts the job's ranks, and what it is told (``deployments/torchrun-node.sh``
    reads it): torchrun ``--standalone`` on this machine; with ``NASFCOS_NODES`` > 1 this
    machine as one node of a c10d rendezvous at ``NASFCOS_RDZV_ENDPOINT`` (a Kubernetes
    Indexed Job's pod 0; the other pods run the node script); with ``NASFCOS_LAUNCHER``
    that command, given the job file, starts every node (SLURM: ``sbatch --wait ...``)."""
    rdzv_id = os.environ.get(RDZV_ID) or job.parent.name  # every node's torchrun must name the same group
    told = {"NASFCOS_NPROC": str(nproc), "NASFCOS_MAX_RESTARTS": str(max_restarts), RDZV_ID: rdzv_id, JOB_FILE: str(job)}
    if launcher:
        return [*shlex.split(launcher), str(job)], told
    if nodes > 1:
        endpoint = os.environ.get(RDZV_ENDPOINT)
        if not endpoint:
            raise ValueError(f"{NODES}={nodes} needs {RDZV_ENDPOINT} (host:port of the first node, where the group meets)")
        rdzv = ["--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id]
    else:
        rdzv = ["--standalone", "--nnodes", "1"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", *rdzv, "--nproc-per-node", str(nproc),
        "--max-restarts", str(max_restarts), "--monitor-interval", "0.5", "-m", "nasfcos.engine.distributed", str(job),
    ]  # fmt: skip
    return cmd, told


def _visible(devices: list[str]) -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` for ranks that use ``cuda:<local rank>``: the devices' GPUs
    (through this process's own visible list, if set)."""
    if torch.device(devices[0]).type != "cuda":
        return {}
    mine = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [str(torch.device(d).index or 0) for d in devices]
    if mine:
        listed = [s.strip() for s in mine.split(",")]
        if any(int(i) >= len(listed) for i in ids):
            raise ValueError(f"devices {devices}: CUDA_VISIBLE_DEVICES={mine} makes only {len(listed)} GPU(s) visible")
        ids = [listed[int(i)] for i in ids]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun (it stops its ranks, each in its own session, within its 30 s), SIGKILL
    it after 60 s: its ranks then see their parent gone and end (:func:`_watch_launcher`)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    except ProcessLookupError:
        pass


def _failure(records: Path, rc: int) -> Exception:
    """The error of a failed launch, from its ranks' records: the arch's (out of memory,
    non-finite loss), bad input, a rank's bug, or the machine's (a rank or node lost)."""
    found = sorted((json.loads(p.read_text()) for p in records.glob("*.json")), key=lambda r: r["time"]) if records.is_dir() else []
    for kind in ("arch", "input", "error"):
        if r := next((r for r in found if r["kind"] == kind), None):
            where = f"rank {r['rank']} ({r['host']})"
            if kind == "error":
                return RuntimeError(f"{where} failed: {r['type']}: {r['message']}")
            return _RERAISED[r["type"]](f"{where}: {r['message']}")
    attempts = 1 + max((r["attempt"] for r in found), default=0)
    last = (
        f"; last: rank {found[-1]['rank']} ({found[-1]['host']}): {found[-1]['type']}: {found[-1]['message']}"
        if found
        else "; no rank reported an error (killed, or the group never formed)"
    )
    return InfrastructureError(f"data-parallel training failed on the machine's side (torchrun exit {rc}, {attempts} attempt(s) recorded){last}")


def _kind(e: BaseException) -> str:
    """How the launcher classes a rank's error (see the module docstring)."""
    if type(e).__name__ in _ARCH_ERRORS:
        return "arch"
    if type(e).__name__ in _USER_ERRORS:
        return "input"
    if isinstance(e, dist.DistError) or is_infrastructure(e):
        return "infrastructure"
    return "error"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nasfcos.engine.distributed JOB``: one rank of a job under torchrun."""
    p = argparse.ArgumentParser(prog="python -m nasfcos.engine.distributed", description="One rank of a data-parallel training job; start it with torchrun.")
    p.add_argument("job", help=f"the job file (<out>/{JOB}, written by train_on_devices or a train-full attempt)")
    a = p.parse_args(argv)
    if not under_torchrun():
        p.error("run under torchrun (RANK and WORLD_SIZE are not set)")
    job = read_job(a.job)
    kwargs = dict(job["kwargs"])
    run_rank(job["spec"], job["dataset"], job["cfg"], Path(a.job).resolve().parent, device=job["device"], log_level=kwargs.pop("log_level", logging.INFO), **kwargs)
    return 0


def under_torchrun() -> bool:
    """Whether this process is a rank torchrun started (``nasfcos train`` then trains as one)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_rank(spec: DetectorSpec, dataset: Dataset, cfg: TrainConfig, out_dir: Path, *, device: str, log_level: int = logging.INFO, **kwargs: Any) -> TrainResult:
    """This process as the rank torchrun's environment names: join the group
    (``env://``), train on ``cuda:<local rank>`` or the CPU, leave; an error is recorded
    for the launcher (``<out>/ranks/``) before it is raised."""
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if rank == 0:
        logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    _watch_launcher()
    records = Path(out_dir) / RANKS
    record = _recorder(records, rank)
    try:
        _stop_if_the_arch_failed(records)
        if torch.device(device).type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        else:  # the ranks of a machine share its cores (OMP_NUM_THREADS wins: torchrun sets 1 for several ranks)
            dev = torch.device("cpu")
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
        # the group's keys under this attempt's prefix: a restarted rank must not read the address a killed one left
        store, _, _ = next(dist.rendezvous("env://"))
        prefix = f"nasfcos/attempt{_attempt()[1]}"
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=dist.PrefixStore(prefix, store), rank=rank, world_size=world)
        result = training.train(spec, dataset, cfg, out_dir, device=dev, rank=rank, world_size=world, **kwargs)
    except BaseException as e:
        record(e)  # before any teardown: destroying a group whose peers wait in a collective may block
        raise  # the process's exit tears the group down
    dist.destroy_process_group()
    return result


def _attempt() -> tuple[str, int]:
    """(torchrun's run id, how many times it restarted this group)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "none"), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def _recorder(records: Path, rank: int):
    run, attempt = _attempt()

    def record(e: BaseException) -> None:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            return  # stopped by torchrun or its caller: not this rank's error
        records.mkdir(parents=True, exist_ok=True)
        r = {
            "rank": rank,
            "host": socket.gethostname(),
            "type": type(e).__name__,
            "message": one_line(e, with_type=False),
            "kind": _kind(e),
            "run": run,
            "attempt": attempt,
            "time": time.time(),
        }
        atomicio.write_json(records / f"{run}-{attempt}-rank{rank}.json", r)

    return record


def _stop_if_the_arch_failed(records: Path) -> None:
    """A group torchrun restarted after an arch failure (out of memory, non-finite loss,
    bad input) on some rank of an earlier attempt fails again at once, without training.
    Only this torchrun run's earlier attempts count: a new launch trains."""
    run, attempt = _attempt()
    if not attempt or not records.is_dir():
        return
    for p in sorted(records.glob("*.json")):
        r = json.loads(p.read_text())
        if r["run"] == run and r["attempt"] < attempt and r["kind"] in ("arch", "input"):
            raise _RERAISED[r["type"]](f"rank {r['rank']} ({r['host']}) failed earlier: {r['message']}")


def _watch_launcher() -> None:
    """End this rank when the process that launched torchrun is gone (a killed flow), or
    torchrun itself (SIGKILLed: this rank's parent changes): otherwise it would go on
    writing the checkpoint a new attempt resumes from."""
    pid, parent = int(os.environ.get(LAUNCHER_PID, 0)), os.getppid()
    if not pid:
        return  # torchrun started by hand: its own agent stops the ranks

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return os.getppid() != parent

    if gone():
        os._exit(1)

    def watch() -> None:
        while not gone():
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
