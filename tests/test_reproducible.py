"""Same config, same seed, same host: the same files, whatever order parallel work finishes in,
and no random draw from a process-global generator (issue #25)."""

import ast
import hashlib
import json
import random
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from helpers import tiny

from nasfcos.rng import local_generator

ROOT = Path(__file__).resolve().parents[1]

# Wall-clock, process and host facts: the only fields two runs may differ in. Files holding
# them are compared as tables with these left out; every other file byte for byte.
CLOCK_FIELDS = {"train_seconds", "eval_seconds", "peak_mem_mb", "started_at", "finished_at", "created_at", "seconds", "elapsed_s", "pid", "mtime_ns"}
# Logs and the human report carry times by design; locks are empty markers.
NOT_COMPARED = ("evaluations.log", "report/", ".lock", "events.jsonl")


def _without_clock(value):
    if isinstance(value, dict):
        return {k: _without_clock(v) for k, v in value.items() if k not in CLOCK_FIELDS}
    if isinstance(value, list):
        return [_without_clock(v) for v in value]
    return value


def _exact(value, root: str):
    """A value as comparable text that keeps every bit: floats as ``float.hex``, tensors and
    arrays as dtype, shape and a hash of their bytes; the run directory's path as a placeholder."""
    if isinstance(value, dict):
        return tuple((str(k), _exact(v, root)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0])) if k not in CLOCK_FIELDS)
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
    or checkpoint without its clock fields (their files hold times, so their bytes differ)."""
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
        return _exact({c: list(df[c]) for c in df.columns}, str(root))
    data = path.read_bytes()
    if path.suffix == ".json":
        return _exact(json.loads(data), str(root))
    if path.suffix == ".pt":  # torch.save's zip names its records after the file name: compare the contents
        return _exact(torch.load(path, weights_only=False, map_location="cpu"), str(root))
    return data.replace(str(root).encode(), b"<run>")


def _files(root: Path) -> dict[str, object]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if not any(part in rel for part in NOT_COMPARED):
            out[rel] = _content(path, root)
    return out


def test_two_sync_runs_with_slots_finishing_in_reverse_order_write_the_same_files(prefect_server, tmp_path, monkeypatch):
    """Two evaluation slots in sync mode; the second run delays slot 0 so slot 1 finishes first."""
    from flows.nas_search import nas_search

    runs = {}
    for name, slow in (("first", 1), ("second", 0)):
        monkeypatch.setenv("NASFCOS_FAULT", f"search:evaluate:{slow}#*=sleep:1.5")
        overrides = tiny("r", tmp_path / name, **{"search.mode": "sync", "execution.slots_per_device": 2})
        state = nas_search(config="tiny", overrides=overrides, return_state=True)
        assert state.is_completed(), state
        runs[name] = tmp_path / name / "r"
    order = {name: (run / "evaluations.log").read_text().split("\n")[0].split()[1] for name, run in runs.items()}
    assert order["first"] != order["second"], f"the hook did not reverse the finishing order: {order}"
    a, b = _files(runs["first"]), _files(runs["second"])
    assert sorted(a) == sorted(b)
    assert any(k.startswith("features.zarr") for k in a) and "results.parquet" in a and "top_k.parquet" in a and "leaderboard.parquet" in a
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"{len(differ)} files differ between the two runs: {differ[:8]}"


def _global_states():
    # Python's generator is not compared: the Prefect client and server threads of this test
    # process draw from it (retry jitter); nasfcos never imports random (the static scan below)
    return torch.get_rng_state(), np.random.get_state()[1].copy(), np.random.get_state()[2]


def _same_states(a, b) -> list[str]:
    same = (torch.equal(a[0], b[0]), np.array_equal(a[1], b[1]) and a[2] == b[2])
    return [n for n, ok in zip(("torch", "numpy"), same, strict=True) if not ok]


def test_no_stage_draws_from_a_global_generator(synthetic_small, tmp_path):
    """Finetune, feature materialisation, a proxy evaluation, the policies: with the global
    torch and NumPy generators seeded before, their states are untouched after."""
    from nasfcos.arch import Arch
    from nasfcos.data import COCODetection
    from nasfcos.engine.checkpoint import detector_from_checkpoint
    from nasfcos.engine.materialise import FeatureComputer, proxy_transforms
    from nasfcos.engine.proxy import ProxyConfig, evaluate_arch, prepare_split
    from nasfcos.engine.train import TrainConfig, train
    from nasfcos.model.detector import DetectorSpec
    from nasfcos.search.evolution import EvolutionConfig
    from nasfcos.search.policies import build_policy

    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    before = _global_states()
    ds = COCODetection(synthetic_small["train_json"], synthetic_small["image_root"], transforms=proxy_transforms(64))
    spec = DetectorSpec(num_classes=3, backbone="tiny", width=32)
    train(spec, ds, TrainConfig(iterations=2, batch_size=4, base_lr=0.01, warmup_iters=1, steps=(1,), checkpoint_every=1, num_workers=0), tmp_path / "ft")
    backbone, _ = detector_from_checkpoint(tmp_path / "ft" / "checkpoint.pt")
    out = FeatureComputer(backbone.backbone, ds, np.arange(8), seed=0, batch_size=4)(0, 8)
    split = prepare_split({k: torch.from_numpy(v) for k, v in out["features"].items()}, out["boxes"], out["labels"], num_classes=3)
    record = evaluate_arch(Arch.random(np.random.default_rng(0)), split, split, num_classes=3, cfg=ProxyConfig(batch_size=4, epochs=1, eval_batch_size=8))
    assert record["status"] == "ok", record["error"]
    for name in ("ppo", "random", "evolution"):
        policy = build_policy(name, seed=0, evolution=EvolutionConfig(population=2, sample_size=2))
        samples = policy.sample(2)
        policy.update(samples, [-1.0, -2.0])
    moved = _same_states(before, _global_states())
    assert not moved, f"a stage drew from the global {', '.join(moved)} generator: route it through nasfcos.rng"


def test_local_generator_draws_are_thread_local_and_repeatable():
    """Two threads building seeded modules while a third draws from the global generator
    get the weights a lone thread gets."""
    from torch import nn

    def build(seed):
        with local_generator(torch.Generator().manual_seed(seed)):
            return torch.cat([p.detach().flatten() for p in nn.Sequential(nn.Conv2d(3, 8, 3), nn.LSTM(8, 8)).parameters()])

    alone = {seed: build(seed) for seed in (1, 2)}
    stop, got = threading.Event(), {}

    def noise():
        while not stop.is_set():
            torch.rand(16)

    def worker(seed):
        got[seed] = [build(seed) for _ in range(20)]

    threads = [threading.Thread(target=noise)] + [threading.Thread(target=worker, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert all(torch.equal(w, alone[seed]) for seed in (1, 2) for w in got[seed])
    assert not torch.equal(alone[1], alone[2])


# Calls that draw from a process-global generator unless given a generator= argument.
_TORCH_RANDOM = {"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson", "rand_like", "randn_like", "randint_like"}
_METHOD_RANDOM = {"uniform_", "normal_", "random_", "bernoulli_", "exponential_", "geometric_", "cauchy_", "log_normal_"}
_INIT_RANDOM = {"uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_", "sparse_"}
_NUMPY_LOCAL = {"default_rng", "Generator", "SeedSequence", "PCG64", "RandomState"}
# Files whose unseeded draws are routed by their callers through nasfcos.rng.local_generator
# (model constructors, random transforms); the runtime test above checks that they are.
ROUTED = {
    "nasfcos/data/transforms.py": "random transforms; SeededSamples runs them under a per-sample generator",
    "nasfcos/model/decoder.py": "weight init in constructors; built under local_generator (proxy, train)",
    "nasfcos/model/ops.py": "weight init in constructors; built under local_generator",
    "nasfcos/model/backbones.py": "weight init in constructors; built under local_generator",
    "nasfcos/search/controller.py": "LSTMPolicy's init; PPOController builds it under local_generator",
}


def _global_draws(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "random" for a in node.names):
            out.append((node.lineno, "import random"))
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name, owner = node.func.attr, ast.unparse(node.func.value)
        seeded = any(k.arg == "generator" for k in node.keywords)
        if owner == "torch" and (name in {"manual_seed", "seed"} or (name in _TORCH_RANDOM and not seeded)):
            out.append((node.lineno, f"torch.{name}"))
        elif owner in {"nn.init", "torch.nn.init", "init"} and name in _INIT_RANDOM and not seeded:
            out.append((node.lineno, f"{owner}.{name}"))
        elif owner not in {"nn.init", "torch.nn.init", "init"} and name in _METHOD_RANDOM and not seeded:
            out.append((node.lineno, f"{owner}.{name}"))
        elif owner in {"np.random", "numpy.random"} and name not in _NUMPY_LOCAL:
            out.append((node.lineno, f"{owner}.{name}"))
        elif owner == "random":
            out.append((node.lineno, f"random.{name}"))
    return out


def test_nasfcos_draws_no_number_from_a_global_generator_outside_the_routed_files():
    found = []
    for path in sorted((ROOT / "nasfcos").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        draws = _global_draws(ast.parse(path.read_text()))
        # a routed file's unseeded draws are its callers' to route; seeding the global generator never is
        found += [f"{rel}:{line}: {what}" for line, what in draws if rel not in ROUTED or what in ("torch.manual_seed", "torch.seed")]
    assert not found, "draws from a process-global generator (use a seeded torch.Generator / np.random.default_rng, or nasfcos.rng):\n" + "\n".join(found)
    assert _global_draws(ast.parse("torch.rand(3)\nnp.random.rand(2)\nimport random\nx.uniform_(0, 1)")) != [], "the scan finds nothing"
    for rel in ROUTED:
        assert (ROOT / rel).exists(), f"ROUTED names a file that is gone: {rel}"
