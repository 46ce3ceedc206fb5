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
    for opt in ("--coco-json", "--voc-root", "--backbone", "--weights", "--loss", "--iters", "--clip-grad", "--out"):
        assert opt in out


def _data_args(paths, split="train"):
    return ["--coco-json", paths[f"{split}_json"], "--image-root", paths["image_root"]]


def _assert_one_line_error(code, err, needle):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0]


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
