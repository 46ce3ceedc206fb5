"""``data.kind: coco``: the whole pipeline on one COCO-format dataset a test writes
(non-contiguous category ids listed out of order, an image without boxes in train and
in val), preflight's one-line errors for bad jsons, and the ``custom`` preset."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.config import load_config

pytest.importorskip("prefect")

# synthetic category id (1 circle, 2 square, 3 triangle) -> ours: no label+1 or label
# mix-up lands in {4, 7, 12}; the json lists them out of order
IDS = {1: 4, 2: 7, 3: 12}
EMPTY = {"train": 105, "val": 109}  # one image of each split loses its boxes


def _image_id(position: int) -> int:
    return 100 + position  # not 1..N either


def _rewrite(src: Path, dst: Path, split: str, *, annotations: bool = True) -> dict:
    data = json.loads(src.read_text())
    for img in data["images"]:
        img["id"] = _image_id(img["id"])
    for ann in data["annotations"]:
        ann["image_id"], ann["category_id"] = _image_id(ann["image_id"]), IDS[ann["category_id"]]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != EMPTY[split]] if annotations else []
    data["categories"] = sorted(({**c, "id": IDS[c["id"]]} for c in data["categories"]), key=lambda c: [12, 4, 7].index(c["id"]))
    dst.write_text(json.dumps(data))
    return data


@pytest.fixture(scope="module")
def coco_dataset(tmp_path_factory):
    """24 train / 8 val synthetic images with our ids; test json = val images without annotations."""
    from nasfcos.data import make_synthetic

    root = tmp_path_factory.mktemp("own-coco")
    paths = make_synthetic(root / "src", num_train=24, num_val=8, image_size=(64, 96), seed=0)
    train = _rewrite(Path(paths["train_json"]), root / "train.json", "train")
    _rewrite(Path(paths["val_json"]), root / "val.json", "val")
    _rewrite(Path(paths["val_json"]), root / "test.json", "val", annotations=False)
    assert EMPTY["train"] in {i["id"] for i in train["images"]} - {a["image_id"] for a in train["annotations"]}
    return {"root": root, "images": paths["image_root"]}


def _data(ds: dict, **changed) -> dict:
    d = {
        "data.kind": "coco", "data.coco_train_json": str(ds["root"] / "train.json"), "data.coco_train_images": ds["images"],
        "data.coco_val_json": str(ds["root"] / "val.json"), "data.coco_val_images": ds["images"],
        "data.coco_testdev_json": str(ds["root"] / "test.json"), "data.coco_testdev_images": ds["images"],
    }  # fmt: skip
    return {**d, **changed}


def test_pipeline_on_own_coco_dataset_keeps_category_ids_and_drops_empty_images_only_in_training(prefect_server, coco_dataset, tmp_path, monkeypatch):
    import nasfcos.model.fcos
    from flows.nas_search import nas_search
    from nasfcos.data.common import DetectionDataset
    from nasfcos.engine.checkpoint import load_checkpoint
    from storage.features import FeatureStore

    loaded: set[tuple[str, int]] = set()  # (json, image id) of every image read, in any stage
    real = DetectionDataset.__getitem__

    def spy(self, index):
        loaded.add((Path(self.records[index].source).name, self.records[index].image_id))
        return real(self, index)

    monkeypatch.setattr(DetectionDataset, "__getitem__", spy)
    post = nasfcos.model.fcos.FCOS.postprocess

    def every_candidate(self, outputs, image_sizes):
        # a model trained 2 iterations scores every class below the 0.05 threshold (the
        # focal prior is 0.01): keep all candidates, so the results json has each class
        self.score_thresh = 0.0
        return post(self, outputs, image_sizes)

    monkeypatch.setattr(nasfcos.model.fcos.FCOS, "postprocess", every_candidate)
    overrides = {"run_id": "own", "runs_dir": str(tmp_path), "execution.report": False, **_data(coco_dataset)}
    state = nas_search(config="tiny", overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    run = tmp_path / "own"
    for stage in ("finetune-backbone", "materialise-features", "search", "select-top-k", "train-full", "evaluate"):
        assert (run / "manifests" / f"{stage}.json").exists(), stage
    assert not (run / "data").exists()  # nothing synthetic generated

    # training: the empty train image is never read; every other train image is
    assert ("train.json", EMPTY["train"]) not in loaded
    assert {i for j, i in loaded if j == "train.json"} == {_image_id(p) for p in range(1, 25)} - {EMPTY["train"]}
    # the proxy's split is drawn from the 23 train images with boxes: 16 + 8 do not fit,
    # scaled down in proportion (nasfcos.engine.materialise.fit_split)
    store = FeatureStore.open(run / "features.zarr")
    assert store.splits == {"meta_train": 15, "meta_val": 8}
    assert store.attrs["classes"] == ["circle", "square", "triangle"]
    ids = np.concatenate([store.read_split(s, levels=["C5"])["image_id"] for s in ("meta_train", "meta_val")])
    assert len(set(ids.tolist())) == 23 and EMPTY["train"] not in ids

    # label -> category id, sorted by id whatever the json order, kept by every checkpoint
    board = pd.read_parquet(run / "leaderboard.parquet")
    assert len(board) >= 1 and board.AP.notna().all() and (board.status == "ok").all()
    for ckpt in [run / "backbone" / "checkpoint.pt"] + [run / "full" / a / "checkpoint.pt" for a in board.arch_id]:
        meta = load_checkpoint(ckpt)["meta"]
        assert (meta["category_ids"], meta["classes"]) == ([4, 7, 12], ["circle", "square", "triangle"]), ckpt

    # evaluation: every val image (the empty one too) predicted; results in our ids
    assert {i for j, i in loaded if j == "val.json"} == {_image_id(p) for p in range(1, 9)}
    for arch_id in board.arch_id:
        out = run / "full" / arch_id
        assert json.loads((out / "val_metrics.json").read_text()).keys() >= {"AP", "AP50"}
        for name in ("detections_val.json", "detections_test-dev.json"):
            dets = json.loads((out / name).read_text())
            assert {d["category_id"] for d in dets} == {4, 7, 12}, name
            assert {d["image_id"] for d in dets} == {_image_id(p) for p in range(1, 9)}, name


def _problems(coco_dataset, tmp_path, **changed) -> list[str]:
    from flows.preflight import problems

    return problems(load_config("tiny", {"run_id": "pre", "runs_dir": str(tmp_path), **_data(coco_dataset, **changed)}))


def _bad_json(tmp_path, coco_dataset, name: str, edit) -> str:
    data = json.loads((coco_dataset["root"] / "train.json").read_text())
    edit(data)
    (tmp_path / name).write_text(json.dumps(data))
    return str(tmp_path / name)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.pop("categories"), r"data.coco_train_json: .*bad.json: missing field categories$"),
        (lambda d: d.update(categories=[]), r"bad.json: categories is empty$"),
        (lambda d: d.pop("images"), r"bad.json: missing field images$"),
        (lambda d: d.update(images=[], annotations=[]), r"bad.json lists no images$"),
        (lambda d: d["annotations"][2].update(image_id=999), r"bad.json: annotations\[2\] \(id 3\): image_id 999 is not in images$"),
        (lambda d: d["annotations"][0].update(category_id=5), r"bad.json: annotations\[0\] \(id 1\): category_id 5 is not in categories$"),
        (lambda d: d.update(annotations=d["annotations"][:1]), r"data.coco_train_json: 1 of its 24 images have a box; .*need at least 2$"),
    ],
    ids=["no-categories", "empty-categories", "no-images", "zero-images", "unknown-image", "unknown-category", "one-boxed-image"],
)
def test_preflight_names_a_bad_train_json_in_one_line(coco_dataset, tmp_path, edit, expected):
    import re

    found = _problems(coco_dataset, tmp_path, **{"data.coco_train_json": _bad_json(tmp_path, coco_dataset, "bad.json", edit)})
    assert len(found) == 1 and re.search(expected, found[0]), found


def test_preflight_checks_paths_images_and_categories_of_every_coco_split(coco_dataset, tmp_path):
    from flows.preflight import PreflightError, preflight

    assert _problems(coco_dataset, tmp_path) == []
    renamed = _bad_json(tmp_path, coco_dataset, "renamed.json", lambda d: d["categories"].append({"id": 20, "name": "star"}))
    found = _problems(
        coco_dataset, tmp_path, **{
            "data.coco_train_images": str(tmp_path / "nowhere"), "data.coco_val_json": str(tmp_path / "missing.json"),
            "data.coco_testdev_images": str(tmp_path),
        },
    )  # fmt: skip
    assert found == [
        f"data.coco_train_images: {tmp_path / 'nowhere'} is not a directory",
        f"data.coco_val_json: {tmp_path / 'missing.json'} does not exist",
        f"data.coco_testdev_images: 8 of the first 8 images of {coco_dataset['root'] / 'test.json'} are not under {tmp_path}, e.g. {tmp_path / '000025.jpg'}",
    ], found
    found = _problems(coco_dataset, tmp_path, **{"data.coco_val_json": renamed})
    assert found == ["data.coco_val_json: categories differ from data.coco_train_json's (ids [20] not in the train json)"], found
    with pytest.raises(PreflightError, match=r"^preflight of run pre: 1 problem: data.coco_val_json: categories differ"):
        preflight(load_config("tiny", {"run_id": "pre", "runs_dir": str(tmp_path), **_data(coco_dataset, **{"data.coco_val_json": renamed})}))


def test_custom_preset_is_the_paper_on_a_coco_dataset_and_new_kind_keeps_old_hashes():
    from flows.stages import stage_hash

    custom, paper = load_config("custom"), load_config("paper")
    assert custom.data.kind == "coco" and custom.data.coco_train_json and custom.data.coco_val_json
    assert (custom.features.train_size, custom.features.val_size) == (4000, 1715)
    for section in ("finetune", "features", "proxy", "search", "select", "train_full"):
        assert getattr(custom, section) == getattr(paper, section), section
    load_config("custom", {"data.coco_train_json": "/d/train.json", "run_id": "mine"})
    # the stage hashes of configs made before kind 'coco' existed (pinned at b73b858)
    assert stage_hash(load_config({"run_id": "x"}), "materialise-features") == "cda722652e3508b9"
    assert stage_hash(load_config("paper"), "materialise-features") == "875c7c20ddfa6322"
