"""The nasfcos command line: help, bad input as one-line errors, train + eval plumbing."""

import json
import shutil

import pytest

from nasfcos.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--coco-json", "--voc-root", "--backbone", "--weights", "--loss", "--iters", "--clip-grad", "--out", "--nproc"):
        assert opt in out


def _data_args(paths, split="train"):
    return ["--coco-json", paths[f"{split}_json"], "--image-root", paths["image_root"]]


def _assert_one_line_error(code, err, needle):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0]


def test_nproc_that_does_not_divide_the_batch_is_one_line_error(capsys, tmp_path, synthetic_small):
    code, _, err = _run(capsys, "train", *_data_args(synthetic_small), "--out", tmp_path, "--backbone", "tiny", "--batch-size", 4, "--nproc", 3, "--device", "cpu")
    _assert_one_line_error(code, err, "--batch-size 4 is not divisible by --nproc 3")


def test_bad_json_is_one_line_error(capsys, tmp_path, synthetic_small):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = _run(capsys, "train", "--coco-json", bad, "--image-root", tmp_path, "--out", tmp_path / "o", "--backbone", "tiny")
    _assert_one_line_error(code, err, str(bad))


def test_inverted_box_is_one_line_error(capsys, tmp_path, synthetic_small):
    data = json.loads(open(synthetic_small["train_json"]).read())
    data["annotations"][0]["bbox"][2] = -5  # x2 < x1
    ann = tmp_path / "inv.json"
    ann.write_text(json.dumps(data))
    code, _, err = _run(capsys, "train", "--coco-json", ann, "--image-root", synthetic_small["image_root"], "--out", tmp_path / "o", "--backbone", "tiny")
    _assert_one_line_error(code, err, str(ann))


def test_malformed_xml_is_one_line_error(capsys, tmp_path, synthetic_small):
    voc = tmp_path / "VOC2012"
    shutil.copytree(synthetic_small["voc_root"], voc)
    name = (voc / "ImageSets/Main/train.txt").read_text().split()[0]
    (voc / "Annotations" / f"{name}.xml").write_text("<annotation><object>")
    code, _, err = _run(capsys, "train", "--voc-root", voc, "--classes", "circle,square,triangle", "--out", tmp_path / "o", "--backbone", "tiny")
    _assert_one_line_error(code, err, f"{name}.xml")


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_bad_image_during_training_is_one_line_error(capsys, tmp_path, synthetic_small, damage):
    images = tmp_path / "images"
    shutil.copytree(synthetic_small["image_root"], images)
    victim = images / json.loads(open(synthetic_small["train_json"]).read())["images"][0]["file_name"]
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(b"\xff\xd8 this is not a jpeg")
    code, _, err = _run(
        capsys, "train", "--coco-json", synthetic_small["train_json"], "--image-root", images, "--out", tmp_path / "o",
        "--backbone", "tiny", "--width", "32", "--iters", "8", "--batch-size", "4", "--num-workers", "1", "--device", "cpu",
    )  # fmt: skip
    _assert_one_line_error(code, err, str(victim))


def test_train_then_eval_writes_checkpoint_detections_and_metrics(capsys, tmp_path, synthetic_small):
    out = tmp_path / "run"
    code, stdout, _ = _run(
        capsys, "train", *_data_args(synthetic_small), "--out", out, "--backbone", "tiny", "--width", "32",
        "--min-size", "64", "--max-size", "96", "--iters", "3", "--batch-size", "4", "--num-workers", "0", "--device", "cpu",
    )  # fmt: skip
    assert code == 0 and (out / "checkpoint.pt").exists(), stdout
    code, stdout, _ = _run(capsys, "eval", *_data_args(synthetic_small, "val"), "--checkpoint", out / "checkpoint.pt", "--num-workers", "0", "--device", "cpu")
    assert code == 0
    assert "AP50" in stdout
    summary = json.loads((out / "detections_metrics.json").read_text())
    assert set(summary["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    dets = json.loads((out / "detections.json").read_text())
    assert isinstance(dets, list)
    assert all(d["category_id"] in (1, 2, 3) for d in dets)
    # the checkpoint refuses a dataset with other classes
    voc_args = ["--voc-root", synthetic_small["voc_root"], "--split", "val", "--classes", "square,circle,triangle"]
    code, _, err = _run(capsys, "eval", *voc_args, "--checkpoint", out / "checkpoint.pt", "--num-workers", "0")
    _assert_one_line_error(code, err, "trained for classes")


def test_missing_checkpoint_is_one_line_error(capsys, tmp_path, synthetic_small):
    code, _, err = _run(capsys, "eval", *_data_args(synthetic_small, "val"), "--checkpoint", tmp_path / "none.pt")
    _assert_one_line_error(code, err, "none.pt")


def test_eval_on_voc_tree_also_prints_voc_map(capsys, tmp_path, synthetic_small):
    from nasfcos.data import VOCDetection
    from nasfcos.evaluation.voc import voc_evaluate

    voc12 = synthetic_small["voc_root"]  # .../VOCdevkit/VOC2012
    voc07 = tmp_path / "VOCdevkit" / "VOC2007"
    shutil.copytree(voc12, voc07)
    classes = ["--classes", ",".join(synthetic_small["classes"])]
    out = tmp_path / "run"
    code, stdout, _ = _run(
        capsys, "train", "--voc-root", voc12, *classes, "--out", out, "--backbone", "tiny", "--width", "32",
        "--min-size", "64", "--max-size", "96", "--iters", "2", "--batch-size", "4", "--num-workers", "0", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, stdout
    ckpt = ["--checkpoint", out / "checkpoint.pt", "--num-workers", "0", "--device", "cpu"]
    # (year directory, --voc-metric) -> expected rule: auto picks 11-point for VOC2007 only.
    for root, flag, rule, key in [
        (voc12, "auto", "VOC2010+ all-point", "10"),
        (voc07, "auto", "VOC2007 11-point", "07"),
        (voc07, "10", "VOC2010+ all-point", "10"),
    ]:
        code, stdout, _ = _run(capsys, "eval", "--voc-root", root, "--split", "val", *classes, *ckpt, "--voc-metric", flag)
        assert code == 0
        assert "AP50" in stdout and "VOC mAP50" in stdout and rule in stdout, stdout
        summary = json.loads((out / "detections_metrics.json").read_text())
        assert summary["voc_metric"] == key
        assert set(summary["VOC_AP50_per_class"]) == set(synthetic_small["classes"])
        dets = json.loads((out / "detections.json").read_text())
        gt = VOCDetection(root, image_set="val", classes=synthetic_small["classes"]).coco_gt()
        assert summary["metrics"]["VOC_mAP50"] == voc_evaluate(gt, dets, use_07_metric=key == "07")["VOC_mAP50"]
    # A COCO json dataset has no VOC metric to choose.
    code, _, err = _run(capsys, "eval", *_data_args(synthetic_small, "val"), *ckpt, "--voc-metric", "07")
    _assert_one_line_error(code, err, "--voc-metric 07 needs a --voc-root")


def test_train_drops_coco_images_without_boxes_and_eval_keeps_them(capsys, caplog, monkeypatch, tmp_path, synthetic_small):
    import logging

    import torch

    import nasfcos.engine.checkpoint
    import nasfcos.engine.train
    import nasfcos.evaluation.coco

    data = json.loads(open(synthetic_small["train_json"]).read())
    ids = [img["id"] for img in data["images"]]
    name = data["images"][0]["file_name"]
    # 1001: no annotation at all; 1002: only a crowd box, which training ignores (remove_empty drops both)
    data["images"] += [{"id": 1001, "file_name": name, "width": 64, "height": 64}, {"id": 1002, "file_name": name, "width": 64, "height": 64}]
    data["annotations"].append({"id": 9001, "image_id": 1002, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 1})
    ann = tmp_path / "with_empty.json"
    ann.write_text(json.dumps(data))
    args = ["--coco-json", ann, "--image-root", synthetic_small["image_root"]]

    seen = {}

    def fake_train(spec, dataset, cfg, out, **kw):
        seen["train"] = list(dataset.image_ids)
        return nasfcos.engine.train.TrainResult(checkpoint=tmp_path / "ckpt.pt", iteration=0, seconds=0.0)

    def fake_predict(model, dataset, **kw):
        seen["eval"] = list(dataset.image_ids)
        return []

    monkeypatch.setattr(nasfcos.engine.train, "train", fake_train)
    monkeypatch.setattr(nasfcos.engine.checkpoint, "detector_from_checkpoint", lambda path: (torch.nn.Identity(), {"meta": {}}))
    monkeypatch.setattr(nasfcos.evaluation.coco, "predict_dataset", fake_predict)
    caplog.set_level(logging.INFO)
    code, _, err = _run(capsys, "train", *args, "--out", tmp_path / "o", "--backbone", "tiny", "--device", "cpu")
    assert code == 0, err
    assert seen["train"] == ids  # both empty images dropped for training
    assert f"dropped 2 of {len(ids) + 2} images" in caplog.text
    code, _, err = _run(capsys, "eval", *args, "--checkpoint", tmp_path / "ckpt.pt", "--results", tmp_path / "d.json", "--device", "cpu")
    assert code == 0, err
    assert seen["eval"] == ids + [1001, 1002]  # evaluation keeps every image


def test_uncached_weight_name_offline_is_one_line_error(capsys, monkeypatch, tmp_path, synthetic_small):
    from urllib.error import URLError

    import torch

    def no_network(url, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty torch cache
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    code, _, err = _run(
        capsys, "train", *_data_args(synthetic_small), "--out", tmp_path / "o", "--weights", "FCOS_ResNet50_FPN_Weights.COCO_V1",
        "--width", "32", "--iters", "1", "--batch-size", "2", "--num-workers", "0", "--device", "cpu",
    )  # fmt: skip
    cache = tmp_path / "torch_home" / "hub" / "checkpoints" / "fcos_resnet50_fpn_coco-99b0c9b7.pth"
    _assert_one_line_error(code, err, "FCOS_ResNet50_FPN_Weights.COCO_V1: not in the torch cache and cannot be downloaded (URLError")
    assert f"place fcos_resnet50_fpn_coco-99b0c9b7.pth (from https://download.pytorch.org/models/fcos_resnet50_fpn_coco-99b0c9b7.pth) at {cache}" in err
