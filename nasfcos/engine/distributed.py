"""Data-parallel training of one detector on several devices of one machine (NAS-FCOS §4.2
trains on 8 GPUs; ``torch.distributed``: NCCL on GPU, gloo on CPU).

:func:`train_on_devices` starts one process per device with ``torch.multiprocessing``
and runs ``nasfcos.engine.train.train`` in each with its rank. What stays equal to one
process, and why:

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
- **Checkpoints.** Only rank 0 writes them, atomically; every rank resumes from the same.

Processes are started by a fork server (a clean process, never the caller: safe from a
threaded Prefect task and with CUDA). The rendezvous is a TCPStore held by the parent on
127.0.0.1, port 0: the OS picks a free port, so concurrent launches never race for one.
One machine only; several machines would use torchrun's rendezvous instead.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from nasfcos.engine import train as training  # train() looked up at call time: tests replace it
from nasfcos.engine.checkpoint import CHECKPOINT, load_checkpoint
from nasfcos.engine.train import TrainConfig, TrainResult
from nasfcos.model.detector import DetectorSpec

HOST = "127.0.0.1"
# errors a rank raises that mean bad input, re-raised as themselves (one line in the CLI)
_USER_ERRORS = {e.__name__: e for e in (ValueError, FileNotFoundError, FloatingPointError)}


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


def train_on_devices(
    spec: DetectorSpec,
    dataset: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    devices: Sequence[str],
    **kwargs: Any,
) -> TrainResult:
    """``nasfcos.engine.train.train`` on ``devices``, one rank each (one device: in this process).

    ``kwargs`` are ``train``'s (``backbone_weights``, ``init_checkpoint``, ``meta``,
    ``stop_at``); ``dataset`` is pickled to every rank. The result is read back from
    rank 0's checkpoint.
    """
    devices = list(devices)
    if len(devices) == 1:
        return training.train(spec, dataset, cfg, out_dir, device=devices[0], **kwargs)
    backend = backend_for(devices)
    if cfg.batch_size % len(devices):
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {len(devices)} devices (--nproc / train_full.devices_per_arch)")
    store = dist.TCPStore(HOST, 0, None, True, wait_for_workers=False)  # the parent holds it until the ranks end
    t0 = time.perf_counter()
    try:
        mp.start_processes(
            _rank,
            args=(store.port, backend, devices, logging.getLogger().getEffectiveLevel(), spec, dataset, cfg, str(out_dir), kwargs),
            nprocs=len(devices),
            join=True,
            start_method=_start_method(),
        )
    except mp.ProcessRaisedException as e:
        raise _rank_error(e) from None
    finally:
        del store
    ckpt_path = Path(out_dir) / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path)
    return TrainResult(checkpoint=ckpt_path, iteration=int(ckpt["iteration"]), seconds=time.perf_counter() - t0, last_losses=ckpt["losses"])


def _start_method() -> str:
    """``forkserver``: each rank is forked from a clean server process that imported torch
    and nasfcos once (per parent process), so later launches skip those seconds; like
    ``spawn`` it never forks the caller's threads or CUDA state. The server keeps the
    environment of its first use (set ``CUDA_VISIBLE_DEVICES`` before, or name devices)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["nasfcos.engine.train"])  # no effect once the server runs
    return "forkserver"


def _rank(rank: int, port: int, backend: str, devices: list[str], log_level: int, spec, dataset, cfg, out_dir: str, kwargs: dict) -> None:
    """One spawned rank: join the group, train, leave."""
    if rank == 0:
        logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # N CPU ranks share the cores, as torchrun's OMP_NUM_THREADS=1 default intends
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(devices)))
    store = dist.TCPStore(HOST, port, len(devices), False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=len(devices))
    try:
        training.train(spec, dataset, cfg, out_dir, device=device, rank=rank, world_size=len(devices), **kwargs)
    finally:
        dist.destroy_process_group()


def _rank_error(e: mp.ProcessRaisedException) -> Exception:
    """A rank's exception as one line: the same type for user errors, else RuntimeError."""
    lines = str(e).strip().splitlines()
    # the traceback's last "SomeError: message" line (a message may span several lines)
    found = [m for m in map(re.compile(r"^([A-Za-z_][\w.]*): (.*)").match, lines) if m]
    name, msg = (found[-1].group(1).rsplit(".", 1)[-1], found[-1].group(2)) if found else ("", lines[-1])
    if name in _USER_ERRORS:
        return _USER_ERRORS[name](msg)
    return RuntimeError(f"rank {e.error_index} failed: {name + ': ' if name else ''}{msg}")
