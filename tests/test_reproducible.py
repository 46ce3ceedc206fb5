"""Same config, same seed, same host: no random draw from a process-global generator, and
random streams that stay a thread's own (issue #25). That two runs write the same files,
whatever order parallel work finishes in and however often they are killed, is the kill
matrix's test (tests/test_kill_matrix.py)."""

import ast
import random
import threading
from pathlib import Path

import numpy as np
import torch

from nasfcos.rng import local_generator

ROOT = Path(__file__).resolve().parents[1]


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
