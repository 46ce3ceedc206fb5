"""Config wiring: every identity field of the search stage's sections (``search``, ``proxy``)
reaches the code that uses it.

The search stage runs (tiny preset, the real Prefect flow and tasks) with every such field
off its default, while spies at the consumers (the policy constructors, the search loop,
``evaluate_arch``, ``prepare_split``, ``make_row``, ``decoder_cost``) record the arguments
they receive; a value dropped on the way (as ``search.ops`` once was: it reached no policy)
fails the test, naming the field. The field list comes from ``flows.config``: a field added
later without a line in ``WIRES`` fails too, asking for one. To stay within seconds the
features are a small random store (no finetune, no materialise) and ``evaluate_arch``'s spy
returns a record instead of training (``STUBS``); every other spy calls its consumer.

No single valid config sets every field (``search.rungs`` needs mode async, the PPO settings
are the ppo policy's, ``search.warm_start`` is evolution's), so the stage runs twice
(``RUNS``): a field whose ``Wire.run`` names a run is set and checked in that run only,
every other field in both.
"""

from __future__ import annotations

import inspect
import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from helpers import record, tiny, tiny_feature_store

pytest.importorskip("prefect")

SECTIONS = ("search", "proxy")  # the search stage's own sections (flows/stages.py)


class At(NamedTuple):
    """What the spies ``spies`` saw of a value: ``get`` of each recorded call (its bound
    arguments, defaults applied, and ``spy``: the spy's name)."""

    spies: tuple[str, ...]
    get: Callable[[dict], Any]

    def __call__(self, seen: dict[str, list[dict]]) -> set:
        return {self.get(call) for name in self.spies for call in seen[name]}


class Wire(NamedTuple):
    value: Any  # off the field's default and off the tiny preset's value
    at: At  # its consumers; every call they get must carry ``expect``
    run: str = ""  # "": set in both runs; else the only run it fits (RUNS)
    expect: Any = None  # what arrives, when not ``value`` itself


POLICY = ("PPOController", "EvolutionPolicy", "RandomPolicy")  # nasfcos.search.policies.build_policy's
LOOP = ("run_search", "run_search_async")  # nasfcos.search.sync, nasfcos.search.asynchronous
PROXY = ("evaluate_arch",)  # nasfcos.engine.proxy: its ProxyConfig (``cfg``)

OPS = ("sep_conv_3x3", "skip_connect", "conv1x1", "conv3x3")  # CPU-cheap, as the demo's
WARM = "warm/results.parquet"  # written by the test in its working directory
WARM_ROWS = 3

# identity field -> (a value off its default, where it must arrive). A new field: one line here.
WIRES: dict[str, Wire] = {
    "search.archs_per_step": Wire(3, At(LOOP, lambda c: c["cfg"].archs_per_step)),
    "search.policy": Wire("evolution", At(POLICY, lambda c: {"PPOController": "ppo", "EvolutionPolicy": "evolution", "RandomPolicy": "random"}[c["spy"]]), run="evolution"),
    "search.population": Wire(3, At(("EvolutionPolicy",), lambda c: c["cfg"].population), run="evolution"),
    "search.sample_size": Wire(2, At(("EvolutionPolicy",), lambda c: c["cfg"].sample_size), run="evolution"),
    "search.warm_start": Wire(WARM, At(("EvolutionPolicy",), lambda c: len(c["warm_start"])), run="evolution", expect=WARM_ROWS),
    "search.head": Wire("dag", At(POLICY, lambda c: c["head"].head)),
    "search.ops": Wire(OPS, At(POLICY, lambda c: c["head"].ops)),
    "search.seed": Wire(5, At(POLICY, lambda c: c["seed"])),
    "search.failure_penalty": Wire(-3.5, At((*LOOP, "make_row"), lambda c: c["cfg"].failure_penalty if "cfg" in c else c["penalty"])),
    "search.controller_lr": Wire(3e-4, At(("PPOController",), lambda c: c["cfg"].lr), run="sync"),
    "search.controller_update": Wire("buffer", At(("PPOController",), lambda c: c["cfg"].update), run="sync"),
    "search.ppo_epochs": Wire(2, At(("PPOController",), lambda c: c["cfg"].ppo_epochs), run="sync"),
    "search.mode": Wire("sync", At(LOOP, lambda c: {"run_search": "sync", "run_search_async": "async"}[c["spy"]]), run="sync"),
    "search.max_decoder_params": Wire(10**9, At(LOOP, lambda c: c["cfg"].max_decoder_params if c["cost"] else "no cost function")),
    "search.max_decoder_macs": Wire(10**13, At(LOOP, lambda c: c["cfg"].max_decoder_macs if c["cost"] else "no cost function")),
    "search.rungs": Wire((1, 2), At(LOOP, lambda c: tuple(c["cfg"].rungs)), run="evolution"),
    "search.eta": Wire(2, At(LOOP, lambda c: c["cfg"].eta), run="evolution"),
    "search.reward": Wire("ap", At(PROXY, lambda c: c["cfg"].reward)),
    "proxy.width": Wire(96, At((*PROXY, "decoder_cost"), lambda c: c["cfg"].width if "cfg" in c else c["width"])),
    "proxy.lr": Wire(1e-3, At(PROXY, lambda c: c["cfg"].lr)),
    "proxy.batch_size": Wire(4, At(PROXY, lambda c: (c["cfg"].batch_size, c["cfg"].eval_batch_size)), expect=(4, 4)),
    "proxy.epochs": Wire(2, At(PROXY, lambda c: c["cfg"].epochs), run="sync"),  # under rungs a rung's epochs arrive instead
    "proxy.ema_decay": Wire(0.5, At(PROXY, lambda c: c["cfg"].ema_decay)),
    "proxy.seed": Wire(7, At(PROXY, lambda c: c["cfg"].seed)),
    "proxy.size_range_scale": Wire(0.5, At(("prepare_split",), lambda c: c["size_range_scale"])),
}

# each run's settings besides the wires: budgets, and what flows/config.py's checks ask for
RUNS: dict[str, dict[str, Any]] = {
    "evolution": {"search.total_archs": 4, "proxy.epochs": 2},  # the top rung is proxy.epochs
    "sync": {"search.total_archs": 3},
}


def _spies() -> dict[str, tuple[Any, str]]:
    """name -> (module, attribute) of each consumer; a field's ``At`` names the ones it must reach."""
    from nasfcos.engine import proxy
    from nasfcos.model import complexity
    from nasfcos.search import asynchronous, policies, rows, sync

    spies = {name: (policies, name) for name in POLICY}
    spies.update({"run_search": (sync, "run_search"), "run_search_async": (asynchronous, "run_search_async"), "make_row": (rows, "make_row")})
    spies.update({name: (proxy, name) for name in ("evaluate_arch", "prepare_split")})
    spies["decoder_cost"] = (complexity, "decoder_cost")
    return spies


def _spy(name: str, real: Callable, seen: dict[str, list[dict]]) -> Callable:
    """``real`` (or its stand-in in STUBS), recording the arguments of each call in ``seen[name]``."""
    signature, call = inspect.signature(real), STUBS.get(name, real)

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        seen[name].append({**bound.arguments, "spy": name})
        return call(*args, **kwargs)

    return spy


def _install(monkeypatch, seen: dict[str, list[dict]]) -> None:
    """Every consumer replaced by its spy, in its module and in any flows module holding it."""
    flows = [m for n, m in list(sys.modules.items()) if n == "flows" or n.startswith(("flows.", "nasfcos.search."))]
    for name, (module, attr) in _spies().items():
        real = getattr(module, attr)
        spy = _spy(name, real, seen)
        for m in (module, *(f for f in flows if getattr(f, attr, None) is real)):
            monkeypatch.setattr(m, attr, spy)


def identity_fields() -> list[str]:
    """``section.field`` of every identity field of the search stage's sections, from flows.config."""
    from flows.config import PipelineConfig, role

    out = []
    for s in SECTIONS:
        section = PipelineConfig.model_fields[s].annotation
        out += [f"{s}.{k}" for k in section.model_fields if role(section, k) == "identity"]
    return out


def test_every_identity_field_has_a_wire():
    from flows.config import PipelineConfig, load_config

    fields = identity_fields()
    missing = [f for f in fields if f not in WIRES]
    assert not missing, f"identity fields without a wiring check: {missing}; add a line for each to WIRES in tests/test_wiring.py (a value off its default, the spy it must reach)"
    stale = sorted(set(WIRES) - set(fields))
    assert not stale, f"WIRES names fields that are not identity fields of {SECTIONS}: {stale}"
    preset = load_config("tiny", tiny("x", "runs"))
    for field, wire in WIRES.items():
        s, k = field.split(".")
        assert wire.run in ("", *RUNS), f"{field}: run {wire.run!r} is not one of {list(RUNS)}"
        assert all(n in _spies() for n in wire.at.spies), f"{field}: no spy named {wire.at.spies}"
        default = PipelineConfig.model_fields[s].annotation.model_fields[k].default
        assert wire.value not in (default, getattr(getattr(preset, s), k)), f"{field}: {wire.value!r} is its default or the tiny preset's value"


def _evaluate_arch(arch, train, val, *, num_classes, cfg, **_):
    """The spy's stand-in for the proxy training (seconds per arch): a record as evaluate_arch's."""
    from nasfcos.arch import resolve

    arch = resolve(arch)
    return {**record(arch, int(arch.arch_id[:4], 16) / 65536), "seed": cfg.seed, "epochs": cfg.epochs}


STUBS = {"evaluate_arch": _evaluate_arch}  # spies that stand in for their consumer instead of calling it


def _write_warm_start(path) -> None:
    """WARM_ROWS ok rows of archs in the wired head space and ops (an evolution warm start)."""
    from nasfcos.arch import token_space
    from nasfcos.search.policies import RandomPolicy
    from nasfcos.search.rows import make_row
    from storage.results import ResultsTable

    archs = [s.arch for s in RandomPolicy(seed=1, head=token_space(WIRES["search.head"].value, WIRES["search.ops"].value)).sample(WARM_ROWS)]
    ResultsTable(path).append([make_row(record(a, 0.1 * i), step=0, sample=i, penalty=-10.0) for i, a in enumerate(archs)])


def test_search_and_proxy_fields_reach_their_consumers(prefect_server, tmp_path, monkeypatch):
    from flows.config import load_config
    from flows.placement import task_runner
    from flows.search import search
    from flows.stages import portable

    monkeypatch.chdir(tmp_path)  # WARM is relative to it
    _write_warm_start(tmp_path / "warm")
    runs = tmp_path / "runs"
    failures = []
    for name, extra in RUNS.items():
        wires = {f: w for f, w in WIRES.items() if w.run in ("", name)}
        settings = {**extra, **{f: list(w.value) if isinstance(w.value, tuple) else w.value for f, w in wires.items()}, "execution.report": False}
        cfg = load_config("tiny", tiny(name, runs, **settings))
        tiny_feature_store(runs / name)
        seen: dict[str, list[dict]] = defaultdict(list)
        with monkeypatch.context() as m:
            _install(m, seen)
            out = search.with_options(task_runner=task_runner(cfg))(portable(cfg))
        assert out["unique_archs"] == extra["search.total_archs"], (name, out)
        for field, wire in wires.items():
            want = wire.value if wire.expect is None else wire.expect
            got = wire.at(seen)
            if got != {want}:
                failures.append(f"run {name}: {field}={wire.value!r} did not arrive at {'/'.join(wire.at.spies)}: they got {sorted(got, key=repr) or 'no call'}, want {want!r}")
    assert not failures, "config values lost on the way to their consumers:\n" + "\n".join(failures)
