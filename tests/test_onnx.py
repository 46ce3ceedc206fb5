"""ONNX export (issue #30, items 3 and 6): ``nasfcos export --onnx`` writes the network as
ONNX (dynamic batch and size, opset 21, DeformConv for deformable convs, NMS left to
nasfcos); ONNX Runtime's raw outputs equal ``Detector``'s within 1e-4 and its detections
are the same, for FPN-FCOS and the searched NAS-FCOS decoder (16 deformable convs), each
trained 20 iterations (random weights tie scores across NMS)."""

import json

import pytest
import torch

import nasfcos
from nasfcos.data import COCODetection, build_transforms, collate, read_image
from nasfcos.engine.checkpoint import detector_from_checkpoint
from nasfcos.engine.train import TrainConfig, train
from nasfcos.model.detector import DetectorSpec

for extra in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(extra, reason="the export extra (make test installs it)")


@pytest.fixture(scope="module", params=["fpn-fcos", "nas-fcos"])
def exported(request, synthetic_small, tmp_path_factory):
    """(checkpoint folder, exported folder with model.onnx, the arch) of a tiny detector trained 20 iterations."""
    from nasfcos.export import export

    train_ds = COCODetection(synthetic_small["train_json"], synthetic_small["image_root"], transforms=build_transforms(train=True, min_size=64, max_size=96))
    meta = {"classes": list(train_ds.classes), "category_ids": list(train_ds.category_ids), "eval_min_size": 64, "eval_max_size": 96}
    cfg = TrainConfig(iterations=20, batch_size=4, base_lr=0.01, warmup_iters=2, steps=(15,), checkpoint_every=20, log_every=10, num_workers=0)
    out = tmp_path_factory.mktemp(request.param)
    train(DetectorSpec(num_classes=len(train_ds.classes), backbone="tiny", width=64, decoder=request.param), train_ds, cfg, out / "ckpt", meta=meta)
    export(out / "ckpt", out / "exported", onnx=True)
    return out / "ckpt", out / "exported", request.param


def _val_images(synthetic_small):
    images = json.loads(open(synthetic_small["val_json"]).read())["images"]
    pics = [read_image(f"{synthetic_small['image_root']}/{im['file_name']}") for im in images]
    return pics


def test_onnx_runtime_equals_the_detector(exported, synthetic_small):
    ckpt, folder, arch = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["onnx"]["opset"] == 21 and config["onnx"]["nms_in_graph"] is False and config["onnx"]["checked"]["max_abs_diff"] < 1e-4
    model, _ = detector_from_checkpoint(ckpt / "checkpoint.pt")
    model.eval()
    torch_exported = nasfcos.load(folder)
    onnx_exported = nasfcos.load(folder, runtime="onnx")
    if arch == "nas-fcos":  # the graph holds the deformable convs as ONNX DeformConv
        import onnx

        ops = {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
        assert "DeformConv" in ops and "NonMaxSuppression" not in ops
    pics = _val_images(synthetic_small)
    for size, n in ((64, 4), (112, 2), (96, 1)):  # dynamic batch and size; one image (traced with two)
        tf = build_transforms(train=False, min_size=size, max_size=int(size * 1.5))
        x, _ = collate([tf(p, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}) for p in pics[:n]])
        with torch.no_grad():
            ref = model(x)
            ref_folded = model.decoder(model._folded_backbone()(x))
            via_folder = torch_exported.model(x)
        via_onnx = onnx_exported.model(x)
        for r, rf, f, o in zip(ref, ref_folded, via_folder, via_onnx, strict=True):
            for a, b, c, d in zip(r, rf, f, o, strict=True):
                assert a.shape == d.shape
                assert torch.equal(a, c)  # the safetensors folder: the same weights, the same graph
                assert float((b - d).abs().max()) < 1e-4 and float((a - d).abs().max()) < 1e-4
    # the detections: same count, labels and order; boxes and scores within float rounding
    found_torch = nasfcos.load(ckpt)(pics)
    found_onnx = onnx_exported(pics)
    assert sum(len(d["scores"]) for d in found_torch) > 0
    for a, b in zip(found_torch, found_onnx, strict=True):
        assert torch.equal(a["labels"], b["labels"]) and a["names"] == b["names"]
        assert torch.allclose(a["scores"], b["scores"], atol=1e-5) and torch.allclose(a["boxes"], b["boxes"], atol=1e-3)


@pytest.mark.parametrize("exported", ["fpn-fcos"], indirect=True)  # one arch is enough here
def test_predict_runtime_onnx_writes_the_same_results(exported, synthetic_small, tmp_path):
    from nasfcos.cli import main
    from nasfcos.evaluation.coco import coco_evaluate

    ckpt, folder, arch = exported
    args = ["--images", str(synthetic_small["val_json"]), "--image-root", str(synthetic_small["image_root"])]
    assert main(["predict", "--checkpoint", str(ckpt), *args, "--out", str(tmp_path / "t.json")]) == 0
    assert main(["predict", "--model", str(folder), "--runtime", "onnx", *args, "--out", str(tmp_path / "o.json")]) == 0
    t, o = (json.loads((tmp_path / f).read_text()) for f in ("t.json", "o.json"))
    assert [(r["image_id"], r["category_id"]) for r in t] == [(r["image_id"], r["category_id"]) for r in o]
    gt = COCODetection(synthetic_small["val_json"], synthetic_small["image_root"]).coco_gt()
    ta, oa = coco_evaluate(gt, t), coco_evaluate(gt, o)
    assert all(abs(ta[k] - oa[k]) < 1e-3 for k in ta)
    card = (folder / "MODEL.md").read_text()
    assert "`model.onnx`: the network" in card and "NMS is not in the graph" in card


@pytest.mark.parametrize("exported", ["fpn-fcos"], indirect=True)  # one arch is enough here
def test_a_refused_export_is_one_line_and_leaves_a_usable_folder(exported, tmp_path, monkeypatch, capsys):
    """An exporter that refuses the arch: `nasfcos export --onnx` exits 2 with one line naming
    the arch and the format to use; the folder's safetensors still loads, no model.onnx."""
    from nasfcos.cli import main

    ckpt, _, arch = exported

    def refuse(*a, **k):
        raise RuntimeError("Unsupported: torchvision::deform_conv2d\nwith a long trace")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ONNX export of fpn-fcos failed" in err and "model.safetensors runs in PyTorch" in err
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["MODEL.md", "config.json", "model.safetensors"]
    assert len(nasfcos.load(tmp_path / "x")([torch.zeros(3, 64, 64, dtype=torch.uint8)] * 2)) == 2
    with pytest.raises(FileNotFoundError, match="no model.onnx"):
        nasfcos.load(tmp_path / "x", runtime="onnx")
    with pytest.raises(ValueError, match="runtime onnx runs on the CPU"):
        nasfcos.load(tmp_path / "x", runtime="onnx", device="cuda")
    monkeypatch.undo()


@pytest.mark.parametrize("exported", ["fpn-fcos"], indirect=True)  # one arch is enough here
def test_onnxruntime_refusing_the_graph_is_one_line_and_a_reexport_drops_a_stale_graph(exported, tmp_path, monkeypatch, capsys):
    import shutil

    import onnxruntime

    from nasfcos.cli import main

    ckpt, folder, arch = exported
    again = tmp_path / "again"
    shutil.copytree(folder, again)
    assert (again / "model.onnx").exists()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(again)]) == 0  # without --onnx: the old graph would not match
    assert not (again / "model.onnx").exists() and "onnx" not in json.loads((again / "config.json").read_text())

    class Refusing:
        def __init__(self, *a, **k):
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for DeformConv(19)")

    monkeypatch.setattr(onnxruntime, "InferenceSession", Refusing)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "y"), "--onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"onnxruntime {onnxruntime.__version__} cannot run the ONNX export of fpn-fcos" in err and "NOT_IMPLEMENTED" in err
    assert not (tmp_path / "y" / "model.onnx").exists() and not list((tmp_path / "y").glob(".tmp-*"))
