"""``nasfcos.load``: a trained checkpoint called on images of any size (issue #30, item 2)
gives the detections the evaluate path (``predict_dataset``) gives, in the image's pixels."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import nasfcos
from nasfcos.data import COCODetection, build_transforms, read_image
from nasfcos.engine.checkpoint import detector_from_checkpoint
from nasfcos.engine.train import TrainConfig, train
from nasfcos.evaluation.coco import predict_dataset, to_coco_results
from nasfcos.model.detector import DetectorSpec


@pytest.fixture(scope="module")
def trained(synthetic_small, tmp_path_factory):
    """A tiny FPN-FCOS trained 20 iterations (random weights tie scores across NMS); width 64:
    GroupNorm(32) needs 2 values per group on a 1x1 P7 of one image."""
    train_ds = COCODetection(synthetic_small["train_json"], synthetic_small["image_root"], transforms=build_transforms(train=True, min_size=64, max_size=96))
    meta = {"classes": list(train_ds.classes), "category_ids": list(train_ds.category_ids), "eval_min_size": 64, "eval_max_size": 96}
    cfg = TrainConfig(iterations=20, batch_size=4, base_lr=0.01, warmup_iters=2, steps=(15,), checkpoint_every=20, log_every=10, num_workers=0)
    out = tmp_path_factory.mktemp("predictor")
    train(DetectorSpec(num_classes=len(train_ds.classes), backbone="tiny", width=64), train_ds, cfg, out, meta=meta)
    return out, meta


def test_load_gives_the_evaluate_paths_detections_in_image_pixels(synthetic_small, trained):
    out, meta = trained
    val = COCODetection(synthetic_small["val_json"], synthetic_small["image_root"], transforms=build_transforms(train=False, min_size=64, max_size=96))
    model, _ = detector_from_checkpoint(out / "checkpoint.pt")
    expected = predict_dataset(model, val, category_ids=meta["category_ids"], batch_size=8)
    detect = nasfcos.load(out)  # the training's folder: its checkpoint.pt
    images = json.loads(open(synthetic_small["val_json"]).read())["images"]
    found = detect([read_image(f"{synthetic_small['image_root']}/{im['file_name']}") for im in images])
    got = [r for im, det in zip(images, found, strict=True) for r in to_coco_results(im["id"], det["boxes"], det["scores"], det["labels"], meta["category_ids"])]
    assert got == expected and len(got) > 0
    for im, det in zip(images, found, strict=True):
        assert det["names"] == [meta["classes"][int(k)] for k in det["labels"]]
        assert (det["boxes"][:, 2] <= im["width"]).all() and (det["boxes"][:, 3] <= im["height"]).all()
    # PIL images and float tensors are taken too, one image or a list
    pil = Image.open(f"{synthetic_small['image_root']}/{images[0]['file_name']}")
    (one,) = detect(pil)
    assert one["boxes"].shape[1] == 4 and len(one["scores"]) == len(one["names"])
    (flt,) = detect(read_image(f"{synthetic_small['image_root']}/{images[0]['file_name']}").float() / 255)
    assert flt["boxes"].shape[1] == 4


def test_bad_images_and_paths_are_one_line_errors(trained, tmp_path):
    out, _ = trained
    detect = nasfcos.load(out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"an image tensor must be \(3, H, W\), got shape \(64, 64\)"):
        detect(torch.zeros(64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="an image must be a PIL image or a \\(3, H, W\\) tensor, got str"):
        detect("street.jpg")
    with pytest.raises(FileNotFoundError, match="no nasfcos checkpoint there"):
        nasfcos.load(tmp_path)


def test_nasfcos_predict_writes_the_evaluate_paths_results_and_drawn_images(synthetic_small, trained, tmp_path, capsys):
    """`nasfcos predict --images <val json>`: the results json is predict_dataset's (same ids,
    boxes, scores: the same pycocotools AP), one PNG drawn per image."""
    from nasfcos.cli import main
    from nasfcos.evaluation.coco import coco_evaluate

    out, meta = trained
    val = COCODetection(synthetic_small["val_json"], synthetic_small["image_root"], transforms=build_transforms(train=False, min_size=64, max_size=96))
    model, _ = detector_from_checkpoint(out / "checkpoint.pt")
    expected = predict_dataset(model, val, category_ids=meta["category_ids"], batch_size=8)
    # no --image-root: the json's images are found in the VOC tree beside annotations/ (the pipeline's runs/<id>/data)
    args = ["predict", "--checkpoint", str(out / "checkpoint.pt"), "--images", str(synthetic_small["val_json"])]
    assert main([*args, "--out", str(tmp_path / "p.json"), "--draw", str(tmp_path / "drawn")]) == 0
    got = json.loads((tmp_path / "p.json").read_text())
    assert got == expected
    gt = val.coco_gt()
    assert coco_evaluate(gt, got) == coco_evaluate(gt, expected)
    assert len(list((tmp_path / "drawn").glob("*.png"))) == len(val)


def test_a_coco_jsons_images_are_found_in_cocos_layout_or_named_when_not(tmp_path):
    from nasfcos.cli import _json_image_root

    ann = tmp_path / "coco" / "annotations"
    ann.mkdir(parents=True)
    (tmp_path / "coco" / "val2017").mkdir()
    (tmp_path / "coco" / "val2017" / "000000000139.jpg").write_bytes(b"")
    # the first image missing, the second there: found by the second
    assert _json_image_root(ann / "instances_val2017.json", ["gone.jpg", "000000000139.jpg"]) == tmp_path / "coco" / "val2017"
    with pytest.raises(ValueError, match=r"instances_val2017.json: none of its first images \(1.jpg, ...\) is in .*; give --image-root"):
        _json_image_root(ann / "instances_val2017.json", ["1.jpg"])


def test_nasfcos_predict_skips_a_bad_image_and_fails_when_none_can_be_read(synthetic_small, trained, tmp_path, capsys):
    from nasfcos.cli import main

    out, _ = trained
    photos = tmp_path / "photos"
    photos.mkdir()
    good = sorted(Path(synthetic_small["image_root"]).glob("*.jpg"))[0]
    (photos / "a.jpg").write_bytes(good.read_bytes())
    (photos / "b.jpg").write_bytes(b"not a jpeg")
    assert main(["predict", "--checkpoint", str(out), "--images", str(photos), "--out", str(tmp_path / "p.json")]) == 0
    err = capsys.readouterr().err
    assert f"nasfcos predict: skipped {photos / 'b.jpg'}: cannot decode image" in err and "a.jpg" not in err
    assert {r["file_name"] for r in json.loads((tmp_path / "p.json").read_text())} <= {str(photos / "a.jpg")}
    (photos / "a.jpg").unlink()
    assert main(["predict", "--checkpoint", str(out), "--images", str(photos / "*.jpg"), "--out", str(tmp_path / "q.json")]) == 2
    assert "nasfcos predict: error: none of the 1 images could be read" in capsys.readouterr().err


def test_an_exported_folder_predicts_what_its_checkpoint_does(trained, tmp_path):
    """`nasfcos export`: weights (safetensors) and config.json; nasfcos.load of the folder gives
    the checkpoint's raw outputs exactly and its detections."""
    from nasfcos.cli import main
    from nasfcos.export import load_exported

    out, meta = trained
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "exported")]) == 0
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["MODEL.md", "config.json", "model.safetensors"]
    card = (tmp_path / "exported" / "MODEL.md").read_text()  # no evaluate-stage card beside this checkpoint: the checkpoint's facts
    assert "Decoder: `fpn-fcos`; backbone `tiny`; width 64" in card and "circle, square, triangle" in card and "model.onnx" not in card
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["format_version"] == 1 and config["classes"] == meta["classes"] and config["category_ids"] == meta["category_ids"]
    assert config["spec"]["decoder"] == "fpn-fcos" and config["input"] == {"min_size": 64, "max_size": 96, "mean": "imagenet", "std": "imagenet"}
    a, _ = detector_from_checkpoint(out / "checkpoint.pt")
    b, _ = load_exported(tmp_path / "exported")
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for la, lb in zip(a.eval()(x), b.eval()(x), strict=True):
            assert all(torch.equal(ta, tb) for ta, tb in zip(la, lb, strict=True))
    images = [torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    for da, db in zip(nasfcos.load(out)(images), nasfcos.load(tmp_path / "exported")(images), strict=True):
        assert torch.equal(da["boxes"], db["boxes"]) and torch.equal(da["scores"], db["scores"]) and da["names"] == db["names"]
    # `nasfcos predict --model FOLDER` writes what `--checkpoint` does
    photos = tmp_path / "photos"
    photos.mkdir()
    for k, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(photos / f"{k}.png")
    assert main(["predict", "--checkpoint", str(out), "--images", str(photos), "--out", str(tmp_path / "a.json")]) == 0
    assert main(["predict", "--model", str(tmp_path / "exported"), "--images", str(photos), "--out", str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


COMMITTED = Path(__file__).parent / "data" / "export-v1"


def test_a_committed_export_of_format_1_still_loads_and_predicts():
    """tests/data/export-v1: written by `nasfcos export` on 2026-12-04 (a tiny FPN-FCOS, 20
    iterations on the synthetic set); its detections on a fixed image are in expected.json.
    A change that stops old folders loading, or changes what they predict, fails here."""
    detect = nasfcos.load(COMMITTED)
    # two images: torch's GroupNorm refuses one 1x1 P7 of width 32 alone (1 value per group)
    images = [torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    found, _ = detect(images)
    expected = json.loads((COMMITTED / "expected.json").read_text())
    assert found["names"][:5] == expected["names"]
    assert torch.allclose(found["scores"][:5], torch.tensor(expected["scores"]), atol=1e-4)
    assert torch.allclose(found["boxes"][:5], torch.tensor(expected["boxes"]), atol=1e-3)
