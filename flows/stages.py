"""Stage bookkeeping: which config a stage's durable files depend on, claiming and
skipping stages in a run directory, run names, artifact keys, portable task parameters."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.config import PipelineConfig, load_config, role
from nasfcos.errors import one_line
from nasfcos.fault_injection import fault_point
from storage.run_dir import RunDir, config_hash
from storage.run_lock import run_lock

# Which config sections each stage depends on; a stage's hash also covers its upstream stage.
_STAGE_SECTIONS = {
    "finetune-backbone": ("data", "finetune"),
    "materialise-features": ("features",),
    "search": ("proxy", "search"),
    "select-top-k": ("select",),
    "train-full": ("train_full",),
    "evaluate": ("evaluate",),
}
_UPSTREAM = {
    "materialise-features": "finetune-backbone",
    "search": "materialise-features",
    "select-top-k": "search",
    "train-full": "select-top-k",
    "evaluate": "train-full",
}


def _fields(cfg: PipelineConfig, stage: str, roles: tuple[str, ...]) -> dict[str, Any]:
    """``section.field: value`` of ``stage``'s sections whose role (flows/config.py) is in ``roles``.

    A field added to a section later (``_NEWER``) is left out while it holds its default:
    a config that does not use it keeps the hashes and claims its run dirs were made with.
    """
    out = {}
    for s in _STAGE_SECTIONS[stage]:
        section = getattr(cfg, s)
        for k, v in section.model_dump(mode="json").items():
            unused = (s, k) in _NEWER and getattr(section, k) == type(section).model_fields[k].default
            if role(type(section), k) in roles and not unused:
                out[f"{s}.{k}"] = v
    return out


def conflict_fields(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """What the durable files of ``stage`` depend on: the identity fields of its sections
    and of its upstream stages'. A run dir must not mix two of these; tuning fields and
    budgets (extendable) may change."""
    out = _fields(cfg, stage, ("identity",))
    if stage in _UPSTREAM:
        out.update(conflict_fields(cfg, _UPSTREAM[stage]))
    return out


def conflict_key(cfg: PipelineConfig, stage: str) -> str:
    return config_hash(conflict_fields(cfg, stage))


# Fields added since roles were introduced: absent from the configs legacy keys were made of.
_NEWER = {
    ("search", "max_consecutive_failures"),
    ("search", "max_attempts"),
    ("search", "plot_every"),
    ("train_full", "baselines"),
    ("search", "max_decoder_params"),
    ("search", "max_decoder_macs"),
    ("search", "population"),
    ("search", "sample_size"),
    ("search", "warm_start"),
    ("search", "rungs"),
    ("search", "eta"),
    ("search", "ops"),
    ("search", "reward"),
    ("finetune", "devices"),
    ("train_full", "jobs"),
    ("train_full", "concurrency"),
    ("train_full", "job_attempts"),
}
# Defaults changed since: a legacy key was computed with the old one (a config that leaves
# the field at its default must still match the claim its run was made with).
_OLD_DEFAULTS = {("train_full", "checkpoint_every"): (1500, 2500)}


def legacy_conflict_key(cfg: PipelineConfig, stage: str) -> str:
    """The key run dirs made before fields had roles were claimed with (every field but
    ``search.total_archs`` and ``train_full.devices_per_arch``): such runs still resume."""
    skip = {("search", "total_archs"), ("train_full", "devices_per_arch")} | _NEWER

    def value(s: str, k: str, v: Any) -> Any:
        new, old = _OLD_DEFAULTS.get((s, k), (None, None))
        return old if new is not None and v == new else v

    parts: dict[str, Any] = {s: {k: value(s, k, v) for k, v in getattr(cfg, s).model_dump(mode="json").items() if (s, k) not in skip} for s in _STAGE_SECTIONS[stage]}
    if stage in _UPSTREAM:
        parts["upstream"] = legacy_conflict_key(cfg, _UPSTREAM[stage])
    return config_hash(parts)


def stage_hash(cfg: PipelineConfig, stage: str) -> str:
    """Hash of the fields that determine ``stage``'s outputs, budgets included (and those of its upstream stages)."""
    parts = _fields(cfg, stage, ("identity", "extendable"))
    if stage in _UPSTREAM:
        parts["upstream"] = stage_hash(cfg, _UPSTREAM[stage])
    return config_hash(parts)


def run_name(stage: str):
    """flow_run_name callable: '<run_id> · <stage>'."""

    def name() -> str:
        config = (flow_run.parameters or {}).get("config")
        run_id = config.get("run_id", "?") if isinstance(config, dict) else config
        return f"{run_id} · {stage}"

    return name


def owner() -> str:
    """Who holds the run lock, as the second caller is told."""
    return f"flow run {flow_run.id} ({flow_run.flow_name})" if flow_run.id else "a process outside Prefect"


def _check_versions(cfg: PipelineConfig, run: RunDir, stage: str) -> None:
    """Warn when finished stages were made by other versions of nasfcos/torch/torchvision;
    refuse to resume a stage begun under other versions (its outputs would mix two
    versions' numbers) unless ``execution.allow_version_change``."""
    finished, mine = run.version_changes(stage)
    if finished:
        get_run_logger().warning("run %s was made by other versions: %s", cfg.run_id, "; ".join(finished))
    if mine and not cfg.execution.allow_version_change:
        raise ValueError(
            f"{run.root}: stage {stage} was begun under other versions ({'; '.join(mine)}) and would mix their results; "
            "finish it with those versions, or set execution.allow_version_change=true"
        )
    if mine:
        get_run_logger().warning("stage %s resumes under other versions (%s): allowed by execution.allow_version_change", stage, "; ".join(mine))


def stage_flow(stage: str, *, redo: Callable[[PipelineConfig, RunDir], bool] | None = None) -> Callable:
    """``@flow`` for a stage: the opening and closing every stage shares, written once.

    The decorated body ``(cfg, run, config) -> outputs`` runs with the run lock held
    (a stage started on its own owns the run directory; as a subflow of ``nas-search`` it
    re-enters its parent's lock), the versions checked and the stage claimed, and only
    when the stage is not done: its manifest does not match the config, or ``redo(cfg,
    run)`` finds its outputs damaged. ``config`` is ``portable(cfg)``, what tasks take.
    What the body returns is written to the stage's manifest and returned."""

    def wrap(body: Callable[[PipelineConfig, RunDir, dict], dict]) -> Callable:
        def owned(config: dict | str = "demo") -> dict:
            cfg = _config(config)
            run = RunDir.at(cfg.runs_dir, cfg.run_id)
            with run_lock(run.root, owner()):
                fault_point(f"stage:{stage}")
                _check_versions(cfg, run, stage)
                h, done = _open(cfg, run, stage)
                if done and not (redo is not None and redo(cfg, run)):
                    return run.manifest(stage)["outputs"]
                out = body(cfg, run, portable(cfg))
                run.finish(stage, h, out)
                return out

        # the flow's parameters are owned's (config), its name and docs the body's
        owned.__name__ = owned.__qualname__ = body.__name__
        owned.__doc__, owned.__module__ = body.__doc__, body.__module__
        return flow(name=stage, flow_run_name=run_name(stage), log_prints=True)(owned)

    return wrap


def publish_summary(cfg: PipelineConfig, run: RunDir, stage: str, what: str, text: str, description: str) -> None:
    """The stage's summary in the UI: markdown artifact ``<run_id>-<what>``, the text and
    the plots the stage changed (drawn into ``runs/<id>/report/`` too)."""
    from prefect.artifacts import create_markdown_artifact

    from flows.report.page import stage_plots

    plots = stage_plots(run.root, portable(cfg), stage, logger=get_run_logger()) if cfg.execution.report else ""
    create_markdown_artifact(key=artifact_key(cfg, what), markdown=f"# {stage}\n\n{text}" + plots, description=description)


def retry_if_infrastructure(task, task_run, state) -> bool:
    """A Prefect ``retry_condition_fn`` that retries infrastructure failures only
    (``nasfcos.errors``); an arch failure or a bug fails the task at once."""
    from nasfcos.errors import is_infrastructure

    return isinstance(state.data, BaseException) and is_infrastructure(state.data)


def task_options(cfg: PipelineConfig, stage: str) -> dict:
    """``with_options`` of a stage's tasks: retries (infrastructure failures only) and
    the stage's timeout (``execution.timeouts``)."""
    return {
        "retries": cfg.execution.retries,
        "retry_delay_seconds": cfg.execution.retry_delay_s,
        "retry_condition_fn": retry_if_infrastructure,
        "timeout_seconds": getattr(cfg.execution.timeouts, stage.replace("-", "_")),
    }


class StageProgress:
    """How far a long stage is, where its user looks: a Prefect progress artifact
    (``<run_id>-<what>-progress``), a bar on a terminal (in a log, a line every 30 s with the
    rate and ETA), and ``refresh`` (a view, e.g. train-full's summary with its loss curves)
    called every ``every_s`` seconds while work is pending, never failing the stage."""

    def __init__(self, cfg: PipelineConfig, what: str, total: int, *, done: int = 0, description: str, unit: str = "task",
                 refresh: Callable[[], None] | None = None, every_s: float = 60.0, logger: Any = None) -> None:  # fmt: skip
        self.cfg, self.what, self.total, self.done, self.description, self.unit = cfg, what, max(total, 1), done, description, unit
        self.refresh, self.every_s, self.log = refresh, every_s, logger or get_run_logger()
        self._refreshed = time.monotonic()

    def __enter__(self) -> StageProgress:
        from prefect.artifacts import create_progress_artifact

        from nasfcos.progress import Progress

        self._artifact = create_progress_artifact(progress=self._percent(), key=artifact_key(self.cfg, f"{self.what}-progress"), description=self.description)
        self._bar = Progress(self.total, self.what, unit=self.unit, initial=self.done, logger=self.log).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def _percent(self) -> float:
        return 100.0 * min(self.done, self.total) / self.total

    def advance(self, n: int = 1, *, refresh_soon: bool = False) -> None:
        """``n`` more done; ``refresh_soon``: the view shows them at the next :meth:`tick`, not ``every_s`` later."""
        from prefect.artifacts import update_progress_artifact

        self.done += n
        self._bar.update(n)
        update_progress_artifact(self._artifact, self._percent())
        if refresh_soon:
            self._refreshed = -float("inf")

    def tick(self) -> None:
        """Call while work is pending: ``refresh`` when it is due."""
        if self.refresh is None or time.monotonic() - self._refreshed < self.every_s:
            return
        self._refreshed = time.monotonic()
        try:
            self.refresh()
        except Exception as e:  # noqa: BLE001 - a view: the stage's outputs are what count
            self.log.warning("%s: progress view not refreshed: %s", self.what, one_line(e))


def results_with_progress(
    cfg: PipelineConfig, what: str, futures: list, *, done: int = 0, total: int | None = None, description: str, refresh: Callable[[], None] | None = None, every_s: float = 60.0
) -> list:
    """``f.result()`` of every future, in order, while :class:`StageProgress` follows them as
    they finish: a stage of hours or days shows in the UI how far it is, as the search does."""
    from prefect.futures import wait

    pending = list(futures)
    with StageProgress(cfg, what, total if total is not None else done + len(futures), done=done, description=description, refresh=refresh, every_s=every_s) as progress:
        while pending:
            finished = wait(pending, timeout=2.0).done
            if finished:
                pending = [f for f in pending if f not in finished]
                progress.advance(len(finished))
            if pending:
                progress.tick()
    return [f.result() for f in futures]


def artifact_key(cfg: PipelineConfig, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{cfg.run_id}-{what}".lower())


def open_stage(config: dict | str, stage: str) -> tuple[PipelineConfig, RunDir, str, bool]:
    """Validate the config (a dict, or a preset name / YAML path for per-stage
    deployments), open the run dir and tell whether ``stage`` is already done."""
    cfg = _config(config)
    run = RunDir.at(cfg.runs_dir, cfg.run_id)
    return (cfg, run, *_open(cfg, run, stage))


def _config(config: dict | str) -> PipelineConfig:
    """A stage's config parameter: a dict (a parent flow's portable config), or a preset
    name / YAML path (a per-stage deployment)."""
    return load_config(config) if isinstance(config, str) else PipelineConfig.model_validate(config)


def _open(cfg: PipelineConfig, run: RunDir, stage: str) -> tuple[str, bool]:
    """(stage hash, done); a stage not done is claimed for this config."""
    h = stage_hash(cfg, stage)
    done = run.is_done(stage, h)
    if done:
        get_run_logger().info("%s: manifest %s matches config hash %s, skipping", stage, run.manifest_path(stage), h)
    else:
        run.claim(stage, conflict_fields(cfg, stage), legacy=legacy_conflict_key(cfg, stage))
    return h, done


def portable(cfg: PipelineConfig) -> dict:
    """The config as task parameters: JSON, with ``runs_dir`` absolute, so tasks in other
    processes or machines (Dask) find the same run directory."""
    c = cfg.model_dump(mode="json")
    c["runs_dir"] = str(Path(cfg.runs_dir).resolve())
    return c
