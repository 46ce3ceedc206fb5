"""The pipeline's one config: a typed model read from YAML, validated with errors naming the field.

Presets ship in ``flows/configs/``: ``demo`` (the synthetic dataset, tiny
backbone, CPU, minutes), ``paper`` (VOC + COCO, R-50, every number from the
paper) and ``custom`` (the paper's settings on your own COCO-format dataset).
``load_config("demo", {"search.total_archs": 64})`` applies dotted overrides,
which is what ``prefect deployment run ... --param overrides=...`` uses.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESET_DIR = Path(__file__).parent / "configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Every field says what it is to a run directory (flows/stages.py hashes by it):
#   identity:   determines a stage's outputs; changing it on a started stage is refused
#   tuning:     only how they are computed (batch sizes for inference, workers, intervals,
#               devices, retries, timeouts); may change between runs of one directory
#   extendable: a budget that may change: the stage re-runs and keeps what it has
ROLES = ("identity", "tuning", "extendable")


def identity(default: Any = ..., **kw: Any) -> Any:
    return Field(default, json_schema_extra={"role": "identity"}, **kw)


def tuning(default: Any = ..., **kw: Any) -> Any:
    return Field(default, json_schema_extra={"role": "tuning"}, **kw)


def extendable(default: Any = ..., **kw: Any) -> Any:
    return Field(default, json_schema_extra={"role": "extendable"}, **kw)


def role(section: type[BaseModel], name: str) -> str:
    extra = section.model_fields[name].json_schema_extra
    return extra.get("role", "") if isinstance(extra, dict) else ""


class DataSection(_Section):
    """Where images come from. ``synthetic`` generates the built-in shapes dataset
    into the run directory and uses it for every stage; ``voc`` is the paper's (VOC for
    finetuning and the proxy task, the ``coco_*`` files for full training and evaluation);
    ``coco`` is one COCO-format dataset (your own) for every stage: finetuning, the proxy's
    meta-train/meta-val split and full training on ``coco_train_*``, evaluation on
    ``coco_val_*``, detections of the optional ``coco_testdev_*``. Adding a kind leaves the
    stage hashes of existing configs as they were (they hash the value, not the choices)."""

    kind: Literal["synthetic", "voc", "coco"] = identity("synthetic")
    voc_root: str | None = identity(None)  # VOCdevkit/VOC2012: backbone finetuning and the proxy task
    voc_split: str = identity("train")
    synthetic_num_train: int = identity(300, ge=8)
    synthetic_num_val: int = identity(60, ge=4)
    synthetic_seed: int = identity(0)
    coco_train_json: str | None = identity(None)  # full training (§4.2); kind coco: also finetuning and the proxy
    coco_train_images: str | None = identity(None)
    coco_val_json: str | None = identity(None)  # COCO val AP
    coco_val_images: str | None = identity(None)
    # image_info_test-dev2017.json (images + categories): results json only
    coco_testdev_json: str | None = identity(None)
    coco_testdev_images: str | None = identity(None)


class FinetuneSection(_Section):
    """§4.1: R-50 + FPN-FCOS finetuned on VOC (30K its, batch 24, lr 0.01, /10 at 18K, 24K, crop 800)."""

    backbone: str = identity("resnet50")
    # backbone init: a local torchvision/nasfcos weights file or a torchvision weight name
    # (e.g. FCOS_ResNet50_FPN_Weights.COCO_V1, from the torch cache); None = random init
    weights: str | None = identity(None)
    width: int = identity(256)
    iterations: int = identity(30_000, ge=1)
    batch_size: int = identity(24, ge=1)
    lr: float = identity(0.01, gt=0)
    steps: tuple[int, ...] = identity((18_000, 24_000))
    warmup: int = identity(500, ge=0)
    min_size: tuple[int, ...] = identity((800,))
    max_size: int = identity(1333)
    crop: int = identity(800)
    clip_grad: float = identity(0.0)
    checkpoint_every: int = tuning(2500, ge=1)
    num_workers: int = tuning(4)
    # data-parallel over the first N of execution.devices (nasfcos/engine/distributed.py), the
    # global batch unchanged: e.g. 8 GPUs, or [cpu, cpu] on 2 cores (two 1-thread ranks)
    devices: int = tuning(1, ge=1)


class FeaturesSection(_Section):
    """§4.1: meta-train 4,000 / meta-val the rest, short side 384 + random 384 crop."""

    train_size: int = identity(4000, ge=1)
    val_size: int | None = identity(None)
    seed: int = identity(0)
    crop: int = identity(384, ge=32)
    shard_size: int = identity(200, ge=1)
    codec: str = identity("blosc-lz4")
    batch_size: int = tuning(32, ge=1)


class ProxySection(_Section):
    """§4.1: width 64, Adam 8e-4, batch 200, 15 epochs, Polyak 0.9."""

    width: int = identity(64)
    lr: float = identity(8e-4, gt=0)
    batch_size: int = identity(200, ge=1)
    epochs: int = identity(15, ge=0)
    ema_decay: float = identity(0.9, ge=0, lt=1)
    seed: int = identity(0)
    # FCOS size ranges x this; None = features.crop / 800 (§4.1: "target object sizes of
    # interest are scaled correspondingly"); 1.0 = FCOS's unscaled 0-64-128-256-512-inf
    size_range_scale: float | None = identity(None, gt=0)


class SearchSection(_Section):
    """§3.3/§4.2: ~2,800 archs; controller hyper-parameters inherited from ref. [14]."""

    total_archs: int = extendable(2800, ge=1)
    archs_per_step: int = identity(8, ge=1)
    # ppo: the paper's LSTM controller; random: random search; evolution: regularised
    # evolution (Real et al. AAAI'19, beyond the paper; nasfcos/search/evolution.py), whose population
    # P and tournament size S follow (benchmarks/strategies.py compares them)
    policy: Literal["ppo", "random", "evolution"] = identity("ppo")
    population: int = identity(64, ge=1)
    sample_size: int = identity(16, ge=1)
    # evolution only: a results.parquet (or its run directory) whose best ok archs (up to
    # population) start the population instead of random archs; None: random start
    warm_start: str | None = identity(None)
    # head search space: seq (the released code's, where the published nas-fcos head was
    # found; default) or dag (the paper text's §3.2.2); docs/fidelity.md says why
    head: Literal["seq", "dag"] = identity("seq")
    # the op names the search may choose (nasfcos.arch FPN_OPS / HEAD_OPS); None: all (the
    # paper's). The CPU demo leaves out def_conv_3x3: torchvision's deformable conv is slow on CPU
    ops: tuple[str, ...] | None = identity(None)
    seed: int = identity(0)
    failure_penalty: float = identity(-10.0)
    controller_lr: float = identity(1e-4, gt=0)
    # the proxy reward: loss (the paper's, §3.3: minus meta-val FCOS loss) or ap (meta-val COCO AP of
    # the proxy-trained decoder, pycocotools: §4.4.1's ablation, Fig. 7). failure_penalty must stay below it
    reward: Literal["loss", "ap"] = identity("loss")
    # batch: ppo_epochs steps per archs_per_step results; buffer: [14]'s 100-entry rollout
    # buffer, ~100 minibatch-1 steps per result (benchmarks/controller_schedule.py)
    controller_update: Literal["batch", "buffer"] = identity("batch")
    ppo_epochs: int = identity(4, ge=1)
    # async (default): every device slot busy, a new arch the moment one finishes, an update
    # every K results; sync: K archs per step, update, repeat (bit-reproducible). docs/user-guide.md and
    # benchmarks/search_scaling.py say why async is the default
    mode: Literal["async", "sync"] = identity("async")
    # cost constraint (MnasNet-style, beyond the paper): archs whose decoder at the proxy
    # geometry (results.parquet's params/macs) is above a limit are never evaluated: each is
    # written once as an over_budget row and another arch is drawn; None = no limit
    max_decoder_params: int | None = identity(None, ge=1)
    max_decoder_macs: int | None = identity(None, ge=1)
    # successive halving (ASHA, beyond the paper): proxy epochs of each rung, ascending, the
    # last = proxy.epochs, e.g. [3, 7, 15]; an arch trains to the next rung (resumed from its
    # saved state) only while it ranks in the top 1/eta of its rung. Needs mode async.
    # None: every arch trains proxy.epochs
    rungs: tuple[int, ...] | None = identity(None)
    eta: int = identity(3, ge=2)
    # failure budget per worker: a worker (or device) failing this many evaluations in a row
    # (arch or infrastructure failures) is drained; with every worker drained the search stops
    max_consecutive_failures: int = tuning(20, ge=1)
    max_attempts: int = tuning(3, ge=1)  # an arch lost this many times (infrastructure failures) gets a failed row naming each
    # redraw the plots (runs/<id>/report/) and the search's summary artifact (plots,
    # archs/hour, ETA) every this many controller steps; 0: only when the search ends
    plot_every: int = tuning(5, ge=0)

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        from nasfcos.arch import TokenSpace

        if v is not None:
            TokenSpace("seq", v)  # its ValueError names unknown ops, or a part left without one
        return v


class SelectSection(_Section):
    top_k: int = extendable(20, ge=1)


class TrainFullSection(_Section):
    """§4.2: COCO, batch 16, 90K its, lr 0.01, /10 at 60K and 80K, 800/1333."""

    num_archs: int = extendable(20, ge=1)  # how many of top_k.parquet to train
    # hand-designed decoders trained beside them with the same budget and seed, the
    # leaderboard's yardstick (a name of nasfcos.arch.PRESETS or an arch string)
    baselines: tuple[str, ...] = extendable(("fpn-fcos",))
    # initialise the backbone from the finetuned detector instead of train_full.weights (decoders
    # start from scratch); the paper starts from ImageNet weights (False), the demo has none (True)
    init_from_finetuned: bool = identity(False)
    # backbone init of full training, as finetune.weights; its own field so that finetuning's
    # COCO-trained weights never leak into COCO training. None = random init
    weights: str | None = identity(None)
    width: int = identity(256)
    head_width: int | None = identity(None)
    iterations: int = identity(90_000, ge=1)
    batch_size: int = identity(16, ge=1)
    lr: float = identity(0.01, gt=0)
    steps: tuple[int, ...] = identity((60_000, 80_000))
    warmup: int = identity(500, ge=0)
    min_size: tuple[int, ...] = identity((800,))
    max_size: int = identity(1333)
    clip_grad: float = identity(0.0)
    # 1.7% of the 90K iterations: a killed job or machine loses at most that much (issue #29)
    checkpoint_every: int = tuning(1500, ge=1)
    num_workers: int = tuning(4)
    # data-parallel devices per arch (nasfcos/engine/distributed.py): execution.devices split into
    # disjoint groups of this size, one arch training on each group at once
    devices_per_arch: int = tuning(1, ge=1)
    # each arch as its own flow run of this deployment on a work pool (flows/train_jobs.py),
    # e.g. "train-arch/local" (a process pool: `make demo`) or a Kubernetes pool's; None:
    # tasks inside the stage's process, on its devices
    jobs: str | None = tuning(None)
    # jobs at once; 0: one per group of devices_per_arch of execution.devices (a local pool's
    # capacity); on a cluster pool, as many as the cluster should run at once
    concurrency: int = tuning(0, ge=0)
    # submissions of one arch's job (a crashed or lost job is submitted again, resuming
    # from its checkpoint); an arch's own failure (OOM, divergence) is not retried
    job_attempts: int = tuning(3, ge=1)

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from nasfcos.arch import resolve

        for arch in v:
            resolve(arch)  # an ArchError (ValueError) says what is wrong with it
        if len(set(v)) != len(v):
            raise ValueError(f"a baseline is listed twice: {list(v)}")
        return v


class EvaluateSection(_Section):
    batch_size: int = tuning(8, ge=1)


class TimeoutsSection(_Section):
    """Seconds one task of each stage may run before it is failed and retried (an
    infrastructure failure); None: no limit. A search evaluation at the paper's geometry
    takes ~15 s on a GPU, up to ~27x that with deformable convs."""

    finetune: float | None = tuning(None, gt=0)
    materialise: float | None = tuning(None, gt=0)  # one shard
    search: float | None = tuning(7200.0, gt=0)  # one proxy evaluation
    train_full: float | None = tuning(None, gt=0)  # one arch
    evaluate: float | None = tuning(None, gt=0)  # one arch


class ExecutionSection(_Section):
    """Devices, how many proxy evaluations share one (``slots_per_device``), the task
    runner; ``flows/placement.py`` says where each task runs."""

    devices: tuple[str, ...] = tuning(("cpu",), min_length=1)
    slots_per_device: int = tuning(1, ge=1)  # proxy evaluations at once on one device
    task_runner: Literal["thread", "dask"] = tuning("thread")
    dask_address: str | None = tuning(None)  # a dask.distributed scheduler; None with "dask" = local cluster
    retries: int = tuning(1, ge=0)  # task retries for infrastructure failures (nasfcos/errors.py)
    retry_delay_s: float = tuning(5.0, ge=0)
    # torchrun restarts of a data-parallel training group (finetune.devices, train_full.devices_per_arch > 1)
    # that lost a rank: it resumes from its last checkpoint; then the task's retries
    max_restarts: int = tuning(1, ge=0)
    # proxy features on the device, or in host memory with batches streamed to it;
    # auto: streamed when they take more than 70% of the device's free memory
    feature_residency: Literal["auto", "device", "host"] = tuning("auto")
    # a local directory: each machine copies the run's feature store there once and
    # evaluations read that copy instead of the shared filesystem
    stage_features: str | None = tuning(None)
    timeouts: TimeoutsSection = tuning(TimeoutsSection())
    # resume a stage begun under other versions of nasfcos/torch/torchvision (mixing their numbers)
    allow_version_change: bool = tuning(False)
    # draw the plots and write runs/<id>/report/ at each stage's end (the stage artifacts show
    # them); false: text summaries only, ~6 s less per pipeline process, for headless batch
    # runs and tests (`python -m flows.report RUN_DIR` draws them any time)
    report: bool = tuning(True)

    @model_validator(mode="after")
    def _devices_for_dask(self) -> "ExecutionSection":
        if self.task_runner != "dask":
            return self
        if self.dask_address:
            # hand-started workers each own one device, pinned by CUDA_VISIBLE_DEVICES,
            # and all call it by one name
            if len(self.devices) != 1:
                raise ValueError("devices: with dask_address give the one name each worker uses for its own device, e.g. [cuda]")
            return self
        # a local cluster starts one worker per entry: pinned to GPU N for cuda:N, or a cpu one
        gpus = [d for d in self.devices if re.fullmatch(r"cuda:\d+", d)]
        if len(gpus) != len(self.devices) and set(self.devices) != {"cpu"}:
            raise ValueError("devices: with task_runner 'dask' and no dask_address list cuda:N (one worker per GPU) or cpu, not both")
        return self


class PipelineConfig(_Section):
    run_id: str = Field(..., min_length=1)
    runs_dir: str = "runs"
    data: DataSection = DataSection()
    finetune: FinetuneSection = FinetuneSection()
    features: FeaturesSection = FeaturesSection()
    proxy: ProxySection = ProxySection()
    search: SearchSection = SearchSection()
    select: SelectSection = SelectSection()
    train_full: TrainFullSection = TrainFullSection()
    evaluate: EvaluateSection = EvaluateSection()
    execution: ExecutionSection = ExecutionSection()

    @model_validator(mode="after")
    def _search_strategy(self) -> "PipelineConfig":
        s = self.search
        if s.sample_size > s.population:
            raise ValueError(f"search.sample_size {s.sample_size} is larger than search.population {s.population}")
        if s.warm_start is not None and s.policy != "evolution":
            raise ValueError(f"search.warm_start is for policy evolution, not {s.policy}")
        if s.rungs is not None:
            if len(s.rungs) < 2 or min(s.rungs) < 1 or list(s.rungs) != sorted(set(s.rungs)):
                raise ValueError(f"search.rungs {list(s.rungs)}: need at least 2 strictly increasing epoch counts >= 1")
            if s.rungs[-1] != self.proxy.epochs:
                raise ValueError(f"search.rungs {list(s.rungs)} must end at proxy.epochs ({self.proxy.epochs}): the top rung is the full proxy task")
            if s.mode != "async":
                raise ValueError("search.rungs (successive halving) needs search.mode async: its promotions are asynchronous (ASHA)")
        return self

    @model_validator(mode="after")
    def _data_parallel(self) -> "PipelineConfig":
        """finetune.devices and train_full.devices_per_arch are the ranks of one training:
        the thread runner (a Dask worker owns one device), devices that fit, a batch they split."""
        devices = self.execution.devices
        checks = (
            ("finetune.devices", self.finetune.devices, "finetune.batch_size", self.finetune.batch_size,
             lambda n: "" if n <= len(devices) else f"is more than the {len(devices)} execution.devices"),
            ("train_full.devices_per_arch", self.train_full.devices_per_arch, "train_full.batch_size", self.train_full.batch_size,
             lambda n: "" if len(devices) % n == 0 else f"does not divide the {len(devices)} execution.devices"),
        )  # fmt: skip
        for field, n, batch_field, batch, misfit in checks:
            if n == 1:
                continue
            if self.execution.task_runner != "thread":
                raise ValueError(f"{field} > 1 needs execution.task_runner 'thread' (a Dask worker owns one device)")
            if why := misfit(n):
                raise ValueError(f"{field} {n} {why}")
            if batch % n:
                raise ValueError(f"{batch_field} {batch} is not divisible by {field} {n}")
        return self


class ConfigError(ValueError):
    """A bad config; one line naming the file and the field."""


def _set_dotted(d: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: override {key!r}: {p!r} is not a section")
    d[parts[-1]] = value


def load_config(source: str | Path | dict, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """A preset name (``demo``, ``paper``), a YAML path or a dict, plus dotted overrides."""
    if isinstance(source, dict):
        where, raw = "config", copy.deepcopy(source)  # overrides must not reach the caller's nested dicts
    else:
        path = PRESET_DIR / f"{source}.yaml" if (PRESET_DIR / f"{source}.yaml").exists() else Path(source)
        where = str(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            presets = ", ".join(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ConfigError(f"{path}: no such config file (presets: {presets})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value, where)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        if not field:  # a check across sections names its fields in the message
            raise ConfigError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
        raise ConfigError(f"{where}: {field}: {err['msg']} (got {err.get('input')!r})") from None
