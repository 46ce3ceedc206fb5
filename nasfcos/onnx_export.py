"""The detector's network as ONNX, and ONNX Runtime standing in for it (issue #30, item 3).

    nasfcos export --checkpoint runs/demo/full/4783218e29f8 --out exported/ --onnx
    nasfcos.load("exported/", runtime="onnx")  ·  nasfcos predict --model exported/ --runtime onnx

The graph is the network only: normalised, padded images ``images`` (N, 3, H, W), N, H and W
dynamic, to the raw outputs of each level, ``cls_<l>`` (N, K, H_l, W_l), ``reg_<l>`` (N, 4,
H_l, W_l), ``ctr_<l>`` (N, 1, H_l, W_l), exactly ``Detector.forward``'s (the backbone with its
frozen BatchNorms folded, as ``Detector.predict`` runs it). **NMS is not in the graph**: decoding
(the FCOS per-level scales, exp), top-k and class-wise NMS stay in ``FCOS.postprocess``, in
torch, so ONNX Runtime's detections are ``Detector.predict``'s (ONNX's ``NonMaxSuppression``
differs from ``torchvision.ops.batched_nms`` in tie order and box form). Exporter:
``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), opset 21: ``DeformConv`` (opset
19+) for the deformable convs, ``GroupNormalization`` (21) for the heads' GroupNorm.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import atomicio
from nasfcos.errors import one_line
from nasfcos.model.detector import Detector
from nasfcos.model.fcos import FCOS, LevelOutputs

OPSET = 21
ONNX_FILE = "model.onnx"
KINDS = ("cls", "reg", "ctr")
# batch 2 and sides whose P7 is 2x3: torch.export fixes a dimension of size 1 in the graph
EXAMPLE_SHAPE = (2, 3, 256, 384)
CHECK_TOLERANCE = 1e-3  # the export's own check on its example (the tests ask 1e-4 of a trained model)


class OnnxExportError(RuntimeError):
    """No ONNX file for this arch (the export extra missing, or the exporter or onnxruntime
    refused it): the message says why and which format to use."""


def _needs_extra() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise OnnxExportError(f"ONNX needs the export extra ({e.name} is missing): pip install 'nasfcos[export]'") from None


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's optimiser logs every pass at INFO (hundreds of lines an arch): warnings only."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _Network(nn.Module):
    """backbone + decoder with the level outputs flattened into a tuple (ONNX has no nested outputs)."""

    def __init__(self, backbone: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.backbone, self.decoder = backbone, decoder

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(t for level in self.decoder(self.backbone(images)) for t in level)


def export_onnx(model: Detector, path: str | Path, *, arch: str = "") -> dict:
    """Write ``path`` (one file, weights inside), run it once in ONNX Runtime on a random batch
    against torch, and return what ``config.json`` records about it. An exporter or runtime
    that refuses the arch is one line naming it and the format to use instead."""
    _needs_extra()
    import onnxruntime as ort

    path = Path(path)
    net = _Network(model._folded_backbone(), model.decoder).eval()
    example = torch.randn(*EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(example)
    levels = len(expected) // len(KINDS)
    names = [f"{k}_{lvl}" for lvl in range(levels) for k in KINDS]
    dynamic = torch.export.Dim.DYNAMIC  # N, H, W symbolic; what the trace assumes of them is not a refusal
    dims = {"images": {0: dynamic, 2: dynamic, 3: dynamic}}
    what = f"ONNX export of {arch or 'the detector'}"
    instead = "the folder's model.safetensors runs in PyTorch (nasfcos.load / nasfcos predict --model)"
    checked: dict = {}

    def export_and_check(tmp: Path) -> None:
        try:
            with _quiet_exporter():  # torch.export, then onnxscript's translation and optimiser
                torch.onnx.export(
                    net, (example,), str(tmp), dynamo=True, opset_version=OPSET, input_names=["images"], output_names=names, dynamic_shapes=dims, external_data=False, verbose=False
                )
        except Exception as e:  # noqa: BLE001 - any exporter failure is the same message: this arch, this reason, the format to use
            raise OnnxExportError(f"{what} failed ({one_line(e)}); {instead}") from None
        try:
            got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"images": example.numpy()})
        except Exception as e:  # noqa: BLE001 - e.g. an op this onnxruntime does not implement
            raise OnnxExportError(f"onnxruntime {ort.__version__} cannot run the {what} ({one_line(e)}); {instead}") from None
        diff = max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected, strict=True))
        if not diff <= CHECK_TOLERANCE:
            raise OnnxExportError(f"{what}: onnxruntime's outputs differ from torch's by {diff:.3g} (> {CHECK_TOLERANCE}); {instead}")
        checked.update(onnxruntime=ort.__version__, example_shape=list(EXAMPLE_SHAPE), max_abs_diff=diff)

    atomicio.write_via_path(path, export_and_check)  # a refused or failed export leaves no file
    return {
        "file": path.name,
        "opset": OPSET,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "nms_in_graph": False,
        "input": "images: (N, 3, H, W) float32, normalised (ImageNet mean/std), zero-padded to a multiple of 32; N, H, W dynamic",
        "outputs": names,
        "checked": checked,
    }


class OnnxDetector:
    """``Detector.predict`` with the network run by ONNX Runtime and the post-processing (decode,
    top-k, NMS) by ``FCOS.postprocess``: what :class:`nasfcos.predictor.Predictor` calls. CPU
    only: the pinned onnxruntime wheel has no CUDA provider (use the PyTorch runtime on a GPU).
    ``session_options``: onnxruntime's (threads, e.g.; its defaults otherwise)."""

    def __init__(self, path: str | Path, fcos: FCOS, *, session_options: Any = None) -> None:
        _needs_extra()
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - a missing, truncated or foreign file: one line naming it
            raise ValueError(f"{path}: onnxruntime {ort.__version__} cannot load it ({one_line(e)})") from None
        self.fcos = fcos.eval()

    def __call__(self, images: Tensor) -> LevelOutputs:
        """The raw level outputs, as ``Detector.forward`` (on CPU)."""
        flat = self.session.run(None, {"images": images.detach().float().cpu().contiguous().numpy()})
        flat = [torch.from_numpy(a) for a in flat]
        return [tuple(flat[i : i + len(KINDS)]) for i in range(0, len(flat), len(KINDS))]

    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        with torch.no_grad():
            return self.fcos.postprocess(self(images), image_sizes)

    def to(self, device: str | torch.device) -> OnnxDetector:  # CPU, always (load refuses another device)
        return self

    def eval(self) -> OnnxDetector:
        return self
