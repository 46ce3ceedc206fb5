"""Smoke tests of the issue #15 benchmarks on CPU: the GPU suite at tiny shapes (one
command, no prefect / flows / zarr / pycocotools imported) and the CPU inference ratio."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Runs the suite as `python benchmarks/gpu_suite.py ...` would, then says which forbidden
# packages got imported.
_RUN = """
import runpy, sys
sys.argv = ["benchmarks/gpu_suite.py", "--small", "--device", "cpu", "--out", sys.argv[1]]
try:
    runpy.run_path("benchmarks/gpu_suite.py", run_name="__main__")
    rc = 0
except SystemExit as e:
    rc = e.code or 0
bad = sorted({m.split(".")[0] for m in sys.modules} & {"prefect", "flows", "zarr", "pycocotools", "storage"})
print("FORBIDDEN", bad)
sys.exit(rc or (3 if bad else 0))
"""


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_gpu_suite_small_runs_on_cpu_and_writes_numbers(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-c", _RUN, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FORBIDDEN []" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["errors"] == []
    assert {"deform", "proxy", "train", "infer", "data", "ddp"} <= res.keys()
    assert res["ddp"]["rows"] == [] and "needs CUDA" in res["ddp"]["note"]  # NCCL / SyncBatchNorm: GPUs only
    # deform_conv2d fp32 and the plain conv: milliseconds
    fp32 = [r for r in res["deform"]["rows"] if r["dtype"] == "float32"]
    assert len(fp32) == 2 and all(_number(r["ms"]) and r["ms"] > 0 for r in fp32)
    # proxy: every arch scored, with a time estimate, a reward and the peer's time
    proxy = res["proxy"]
    assert [r["arch"] for r in proxy["rows"]][:2] == ["fpn-fcos", "nas-fcos"]
    for r in proxy["rows"]:
        assert r["status"] == "ok", r["error"]
        assert all(_number(r[k]) for k in ("epoch_s", "est_paper_s", "reward", "macs"))
    assert _number(proxy["median_est_paper_s"]) and _number(proxy["peer"]["epoch_s"])
    assert any(_number(c.get("speedup")) for c in proxy["concurrency"])
    switched = {r["switch"]: r for r in proxy["ablation"]}
    for label in ("amp off (fp32)", "channels_last off", "sync_free on", "deform fp16"):
        assert switched[label]["status"] == "ok" and _number(switched[label]["reward"]), label
    fp16 = next(d for d in proxy["deform_accuracy"] if d["dtype"] == "float16")
    assert fp16["rank_order_kept"] is True and _number(fp16["max_abs_delta"])
    # training and inference: every model measured beside torchvision
    for r in res["train"]["rows"]:
        assert _number(r.get("images_per_s")) and _number(r.get("x torchvision")), r
    assert all(_number(r.get("images_per_s")) for r in res["train"]["ablation"])
    for r in res["infer"]["rows"] + res["infer"]["postprocess"]:
        assert _number(r.get("median_ms")) and _number(r.get("p90_ms")), r
    assert _number(res["data"]["images_per_s"])
    md = (out / "results.md").read_text()
    for title in ("## Proxy seconds per architecture", "## Training throughput", "## Inference latency", "## Data pipeline"):
        assert title in md


def test_cpu_inference_ratio_script_at_a_tiny_size():
    spec = importlib.util.spec_from_file_location("cpu_inference", ROOT / "benchmarks" / "cpu_inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = torch.get_num_threads()
    try:
        ratios = module.main(["--size", "64", "96", "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-onnx"])  # the ONNX path: tests/test_onnx.py
    finally:
        torch.set_num_threads(saved)
    assert set(ratios) == {"infer", "train"} and all(_number(v) and v > 0 for v in ratios.values())
