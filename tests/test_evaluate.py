"""COCO evaluation with pycocotools and the results export."""

import copy

import pytest
import torch

from nasfcos.data import COCODetection, build_transforms
from nasfcos.evaluation.coco import coco_evaluate, predict_dataset, to_coco_results

GT = {
    "images": [{"id": 1, "width": 200, "height": 100}, {"id": 7, "width": 120, "height": 120}],
    "categories": [{"id": 3, "name": "cat"}, {"id": 90, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 90, "bbox": [100, 20, 60, 60], "area": 3600, "iscrowd": 0},
        {"id": 3, "image_id": 7, "category_id": 90, "bbox": [5, 5, 100, 100], "area": 10000, "iscrowd": 0},
    ],
}


def _perfect():
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9} for a in GT["annotations"]]


def test_perfect_detections_give_ap_one():
    m = coco_evaluate(GT, _perfect())
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)


def test_perturbed_detections_score_lower():
    dets = _perfect()
    for d in dets:
        d["bbox"][0] += 0.25 * d["bbox"][2]  # IoU 0.6: counts at 0.5, not at 0.75
    m = coco_evaluate(GT, dets)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)
    assert 0.0 < m["AP"] < 0.5
    wrong_class = [dict(d, category_id=3) for d in _perfect()]
    assert coco_evaluate(GT, wrong_class)["AP"] < 0.5


def test_no_detections_and_no_mutation():
    gt, dets = copy.deepcopy(GT), _perfect()
    dets_before = copy.deepcopy(dets)
    assert coco_evaluate(GT, []) == {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    coco_evaluate(GT, dets)
    assert GT == gt and dets == dets_before  # pycocotools' loadRes mutates its input; we must not


def test_unknown_image_id_is_an_error():
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(GT, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])


def test_to_coco_results_maps_labels_and_boxes():
    rows = to_coco_results(7, torch.tensor([[10.0, 20.0, 30.0, 60.0]]), torch.tensor([0.5]), torch.tensor([1]), [3, 90])
    assert rows == [{"image_id": 7, "category_id": 90, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5}]
    assert to_coco_results(7, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), [3, 90]) == []


class _OracleModel(torch.nn.Module):
    """Returns, for each image, the ground truth boxes it is told about (in resized coords)."""

    def __init__(self, boxes_per_call):
        super().__init__()
        self.boxes = boxes_per_call

    def predict(self, images, sizes):
        out = []
        for _ in sizes:
            boxes, labels = self.boxes.pop(0)
            out.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": labels})
        return out


def test_predict_dataset_maps_back_to_original_pixels(synthetic_small):
    paths = synthetic_small
    # Resize to short side 2x the original: predictions in resized pixels must be divided by the scale.
    ds_plain = COCODetection(paths["val_json"], paths["image_root"])
    targets = [ds_plain.load_target(i) for i in range(len(ds_plain))]
    ds = COCODetection(paths["val_json"], paths["image_root"], transforms=build_transforms(train=False, min_size=160, max_size=1000))
    resized = []
    for i in range(len(ds)):
        _, t = ds[i]
        resized.append((t["boxes"].clone(), t["labels"].clone()))
        assert t["scale"][0] > 1.5
    results = predict_dataset(_OracleModel(resized), ds, category_ids=ds.category_ids, batch_size=3)
    assert len(results) == sum(len(t["boxes"]) for t in targets)
    m = coco_evaluate(ds.coco_gt(), results)
    assert m["AP50"] == pytest.approx(1.0) and m["AP"] > 0.95


class _FixedModel(torch.nn.Module):
    """Returns the same three detections (labels 0, 1, 2, in resized pixels) for every image."""

    def predict(self, images, sizes):
        boxes = torch.tensor([[8.0, 10.0, 200.0, 60.0], [-4.0, 10.0, 40.0, 120.0], [4.0, -6.0, 12.0, 20.0]])
        scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 2])
        return [{"boxes": boxes.clone(), "scores": scores, "labels": labels} for _ in sizes]


class _ResizedImages(torch.utils.data.Dataset):
    """Two blank 'resized' images whose targets say: scale [sy, sx] = [2, 4] from a 50x30 (HxW) original."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        target = {"image_id": 10 + i, "orig_size": torch.tensor([50, 30]), "scale": torch.tensor([2.0, 4.0])}
        return torch.zeros(3, 100, 120), target


def test_predict_dataset_maps_labels_to_non_contiguous_category_ids_and_boxes_to_original_pixels():
    results = predict_dataset(_FixedModel(), _ResizedImages(), category_ids=[3, 7, 42], batch_size=2)
    # Divide x by sx = 4 and y by sy = 2, then clip x to [0, W=30] and y to [0, H=50]:
    # [8, 10, 200, 60] -> [2, 5, 50, 30] -> [2, 5, 30, 30]    -> xywh [2, 5, 28, 25]
    # [-4, 10, 40, 120] -> [-1, 5, 10, 60] -> [0, 5, 10, 50]  -> xywh [0, 5, 10, 45]
    # [4, -6, 12, 20] -> [1, -3, 3, 10] -> [1, 0, 3, 10]      -> xywh [1, 0, 2, 10]
    # Label l becomes category_ids[l]: 0 -> 3, 1 -> 7, 2 -> 42 (not l + 1).
    expected = [
        {"category_id": 3, "bbox": [2.0, 5.0, 28.0, 25.0], "score": 0.9},
        {"category_id": 7, "bbox": [0.0, 5.0, 10.0, 45.0], "score": 0.8},
        {"category_id": 42, "bbox": [1.0, 0.0, 2.0, 10.0], "score": 0.7},
    ]
    assert results == [{"image_id": image_id, **e} for image_id in (10, 11) for e in expected]


def test_predict_dataset_refuses_cropping_transforms(synthetic_small):
    # A crop moves the image origin: boxes divided by the scale alone would land in the wrong place.
    paths = synthetic_small
    tf = build_transforms(train=False, min_size=64, max_size=1000, crop=32)
    ds = COCODetection(paths["val_json"], paths["image_root"], transforms=tf)
    oracle = _OracleModel([(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))] * len(ds))
    with pytest.raises(ValueError, match=r"crop=None"):
        predict_dataset(oracle, ds, category_ids=ds.category_ids, batch_size=3)
