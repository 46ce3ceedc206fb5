"""Preflight: every path and device the unfinished stages will need, checked before stage 1.

A missing COCO json found only when train-full starts wastes the days of search before
it; a run should fail in its first second, listing every problem at once rather than
one per attempt. Stages already finished are not checked (their inputs may be gone).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from flows.config import PipelineConfig
from flows.stages import stage_hash
from storage.run_dir import STAGES, RunDir


class PreflightError(ValueError):
    """Problems found before the pipeline starts; one line listing them all."""


def _exists(problems: list[str], field: str, value: str | None, *, kind: str = "file") -> None:
    if not value:
        problems.append(f"{field} is required")
        return
    p = Path(value).expanduser()
    if kind == "dir" and not p.is_dir():
        problems.append(f"{field}: {value} is not a directory")
    elif kind == "file" and not p.is_file():
        problems.append(f"{field}: {value} does not exist")


def _writable(problems: list[str], field: str, value: str) -> None:
    """The directory ``value`` can be made: its nearest existing ancestor is writable."""
    path = Path(value).resolve()
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK):
        problems.append(f"{field}: {value} is not writable")


def _weights(problems: list[str], field: str, value: str | None) -> None:
    if not value:
        return
    from nasfcos.model.weights import get_weight, weight_name

    name = weight_name(value)
    if name is None:
        _exists(problems, field, value)
        return
    try:
        get_weight(name)
    except ValueError as e:
        problems.append(f"{field}: {e}")


def _warm_start(problems: list[str], value: str) -> None:
    """The run evolution warm-starts from has results (read only when the search starts)."""
    from storage.results import ResultsTable

    try:
        ResultsTable.of(Path(value).expanduser())
    except FileNotFoundError as e:
        problems.append(f"search.warm_start: {e}")


def _devices(problems: list[str], cfg: PipelineConfig) -> None:
    ex = cfg.execution
    if ex.dask_address:  # the devices are the workers'
        _workers(problems, cfg)
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for d in ex.devices:
        m = re.fullmatch(r"cuda(?::(\d+))?", d)
        if m and int(m.group(1) or 0) >= have:
            problems.append(f"execution.devices: {d} does not exist (this machine has {have} CUDA device{'s' * (have != 1)})")
        elif not m and d != "cpu":
            problems.append(f"execution.devices: {d!r} is neither cpu nor cuda[:N]")


def _workers(problems: list[str], cfg: PipelineConfig, timeout: float = 10.0) -> None:
    """The workers connected to ``execution.dask_address`` now, checked (``flows.workers``);
    none yet (a batch job still queued) is no problem: the search checks those it gets."""
    from distributed import Client

    from flows import workers

    ex = cfg.execution
    try:
        client = Client(ex.dask_address, timeout=timeout)
    except (OSError, TimeoutError) as e:
        problems.append(f"execution.dask_address: no Dask scheduler answers at {ex.dask_address} ({type(e).__name__})")
        return
    with client:
        problems.extend(workers.check(client, cfg, Path(cfg.runs_dir).resolve() / cfg.run_id))


_SAMPLE = 20  # image files looked for per json: a wrong image dir shows at once, 100k stats do not run


@functools.lru_cache(maxsize=8)
def _coco_contents(ann: str, images: str, stamp: tuple[int, int]) -> tuple[dict[int, str], int, int, list[str]]:
    """Categories {id: name}, number of images, of images with a box, and the missing files
    among the first images of a COCO json, parsed as the stages parse it (DataError: one
    line); cached by the json's size and mtime (the CLI and the flow both run preflight)."""
    from nasfcos.data import COCODetection

    ds = COCODetection(ann, images)
    with_boxes = sum(bool((~r.ignore).any()) for r in ds.records)
    missing = [str(r.path) for r in ds.records[:_SAMPLE] if not r.path.is_file()]
    return dict(zip(ds.category_ids, ds.classes, strict=True)), len(ds), with_boxes, missing


def _category_diff(mine: dict[int, str], train: dict[int, str]) -> str:
    parts = []
    if only := sorted(mine.keys() - train.keys()):
        parts.append(f"ids {only[:5]} not in the train json")
    if only := sorted(train.keys() - mine.keys()):
        parts.append(f"train json ids {only[:5]} missing")
    parts += [f"id {k} is {mine[k]!r} here, {train[k]!r} in the train json" for k in sorted(mine.keys() & train.keys()) if mine[k] != train[k]][:3]
    return ", ".join(parts)


def _coco(problems: list[str], cfg: PipelineConfig, todo: set[str]) -> None:
    """``data.kind: coco``: every json the unfinished stages read exists, parses (the
    checks of ``nasfcos.data.COCODetection``: images, categories, annotations naming known
    images and categories, boxes), finds its images, has boxes to learn or evaluate from,
    and lists the categories the train json does (label -> category id is the train json's)."""
    from nasfcos.data import DataError

    d = cfg.data
    needs = {
        "train": todo & {"finetune-backbone", "materialise-features", "train-full"},
        "val": todo & {"evaluate"},
        "testdev": todo & {"evaluate"} if d.coco_testdev_json else set(),
    }
    found: dict[str, dict[int, str]] = {}
    for split, stages in needs.items():
        if not stages:
            continue
        field, ann, images = f"data.coco_{split}_json", getattr(d, f"coco_{split}_json"), getattr(d, f"coco_{split}_images")
        before = len(problems)
        _exists(problems, field, ann)
        _exists(problems, f"data.coco_{split}_images", images, kind="dir")
        if len(problems) > before:
            continue
        path = Path(ann).expanduser()
        try:
            cats, n, with_boxes, missing = _coco_contents(str(path), str(Path(images).expanduser()), (path.stat().st_size, path.stat().st_mtime_ns))
        except DataError as e:
            problems.append(f"{field}: {e}")
            continue
        if not n:
            problems.append(f"{field}: {ann} lists no images")
            continue
        if missing:
            problems.append(f"data.coco_{split}_images: {len(missing)} of the first {min(n, _SAMPLE)} images of {ann} are not under {images}, e.g. {missing[0]}")
        if split == "train" and with_boxes < 2:
            problems.append(f"{field}: {with_boxes} of its {n} images have a box; training and the proxy's meta-train/meta-val split need at least 2")
        if split == "val" and not with_boxes:
            problems.append(f"{field}: none of its {n} images has a box, nothing to evaluate against")
        found[split] = cats
    for split in ("val", "testdev"):
        if "train" in found and split in found and found[split] != found["train"]:
            problems.append(f"data.coco_{split}_json: categories differ from data.coco_train_json's ({_category_diff(found[split], found['train'])})")


def problems(cfg: PipelineConfig) -> list[str]:
    """Everything that would stop an unfinished stage for want of a path, a sound dataset json or a device."""
    run = RunDir(Path(cfg.runs_dir).resolve() / cfg.run_id)
    todo = {s for s in STAGES if not run.is_done(s, stage_hash(cfg, s))}
    out: list[str] = []
    _writable(out, "runs_dir", cfg.runs_dir)
    d = cfg.data
    if d.kind == "voc" and todo & {"finetune-backbone", "materialise-features"}:
        _exists(out, "data.voc_root", d.voc_root, kind="dir")
    if d.kind == "coco":
        _coco(out, cfg, todo)
    if d.kind == "voc":
        needs = {"train": todo & {"train-full"}, "val": todo & {"evaluate"}}
        for split, stages in needs.items():
            if stages:
                _exists(out, f"data.coco_{split}_json", getattr(d, f"coco_{split}_json"))
                _exists(out, f"data.coco_{split}_images", getattr(d, f"coco_{split}_images"), kind="dir")
        if d.coco_testdev_json and "evaluate" in todo:
            _exists(out, "data.coco_testdev_json", d.coco_testdev_json)
            _exists(out, "data.coco_testdev_images", d.coco_testdev_images, kind="dir")
    if "finetune-backbone" in todo:
        _weights(out, "finetune.weights", cfg.finetune.weights)
    if "search" in todo and cfg.search.warm_start and not run.controller.exists():
        _warm_start(out, cfg.search.warm_start)
    if "train-full" in todo and not cfg.train_full.init_from_finetuned:
        _weights(out, "train_full.weights", cfg.train_full.weights)
    if "train-full" in todo and cfg.train_full.jobs:
        _jobs(out, cfg.train_full.jobs)
    if cfg.execution.stage_features:
        _writable(out, "execution.stage_features", cfg.execution.stage_features)
    _devices(out, cfg)
    return out


def _jobs(problems: list[str], name: str) -> None:
    """The ``train-arch`` deployment of ``train_full.jobs`` exists and a worker polls its pool
    (else its jobs would wait, scheduled, for ever). Kubernetes/SLURM pools need theirs running too."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    fix = "deploy it (`prefect deploy --prefect-file deployments/prefect.yaml`) or set train_full.jobs: null to train inside the stage"
    if not PREFECT_API_URL.value():  # a temporary server: no worker can reach it
        problems.append("train_full.jobs: jobs run on a Prefect server's work pool and PREFECT_API_URL is not set; start one (`make demo`) or set train_full.jobs: null")
        return
    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(name)
            pool = deployment.work_pool_name
            online = [w for w in client.read_workers_for_work_pool(pool) if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"] if pool else []
    except ObjectNotFound:
        problems.append(f"train_full.jobs: no deployment {name!r} on the Prefect server; {fix}")
        return
    except Exception as e:  # noqa: BLE001 - no server, a bad name: one line
        problems.append(f"train_full.jobs: cannot read deployment {name!r} ({type(e).__name__}: {' '.join(str(e).split())[:160]})")
        return
    if not pool:
        problems.append(f"train_full.jobs: deployment {name!r} has no work pool")
    elif not online:
        problems.append(f"train_full.jobs: no worker polls work pool {pool!r} of {name!r}; start one (`prefect worker start --pool {pool}`)")


def preflight(cfg: PipelineConfig) -> None:
    """Raise :class:`PreflightError` naming every problem (one line), or return."""
    found = problems(cfg)
    if found:
        raise PreflightError(f"preflight of run {cfg.run_id}: {len(found)} problem{'s' * (len(found) > 1)}: " + "; ".join(found))
