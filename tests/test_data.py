"""Tests for nasfcos.data: loaders on real-format files written here, transforms, synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nasfcos.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VOC_CLASSES,
    COCODetection,
    Compose,
    DataError,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    VOCDetection,
    build_transforms,
    collate,
    make_synthetic,
    read_image,
    resized_hw,
)

# torchvision 0.29 deprecates its decoders in favour of torchcodec; the API still works.

# ---------------------------------------------------------------------------------------------
# helpers writing files in the real formats


def write_image(path: Path, height: int, width: int, seed: int = 0, fmt: str = "JPEG") -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format=fmt)
    return pixels


def voc_object(name: str, xmin, ymin, xmax, ymax, difficult: int | None = 0) -> str:
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    return (
        f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>{diff}"
        f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def write_voc(root: Path, name: str, width: int, height: int, objects: list[str], image: bool = True) -> Path:
    xml = (
        f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{''.join(objects)}</annotation>"
    )
    path = root / "Annotations" / f"{name}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(xml)
    if image:
        write_image(root / "JPEGImages" / f"{name}.jpg", height, width)
    return path


def write_split(root: Path, image_set: str, names: list[str]) -> Path:
    path = root / "ImageSets" / "Main" / f"{image_set}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names))
    return path


def assert_one_line_error(excinfo: pytest.ExceptionInfo, path: Path, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    """Two annotated images (one with a difficult object and one without a <difficult> tag) + one empty."""
    root = tmp_path / "VOCdevkit" / "VOC2007"
    write_voc(
        root,
        "000005",
        width=40,
        height=30,
        objects=[
            voc_object("dog", 1, 1, 10, 20),
            voc_object("person", 5, 6, 40, 30, difficult=1),
            voc_object("cat", 3, 4, 3, 4, difficult=None),  # a one-pixel box, no <difficult> tag
        ],
    )
    write_voc(root, "000007", width=20, height=24, objects=[voc_object("tvmonitor", 2.0, 3.0, 12.0, 13.0)])
    write_voc(root, "000009", width=16, height=16, objects=[])
    write_split(root, "train", ["000005", "000007", "000009"])
    return root


# ---------------------------------------------------------------------------------------------
# read_image


def test_read_image_decodes_rgb_uint8_even_from_grey_png(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((5, 7), 200, np.uint8), "L").save(path)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 7)
    assert torch.all(image == 200)


def test_read_image_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        read_image(tmp_path / "nope.jpg")
    assert_one_line_error(e, tmp_path / "nope.jpg", "image not found")
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg \x00\x01\x02" * 5)
    with pytest.raises(DataError) as e:
        read_image(bad)
    assert_one_line_error(e, bad, "cannot decode image (")


# ---------------------------------------------------------------------------------------------
# VOC


def test_voc_boxes_are_zero_based_continuous_and_difficult_kept_as_ignore(voc_root: Path) -> None:
    ds = VOCDetection(voc_root, image_set="train")
    assert ds.classes == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    assert ds.category_ids == list(range(1, 21))
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3]

    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    # 1-based inclusive (xmin, ymin, xmax, ymax) → (xmin-1, ymin-1, xmax, ymax):
    # dog 1,1,10,20 → 0,0,10,20; person 5,6,40,30 → 4,5,40,30; cat 3,4,3,4 (one pixel) → 2,3,3,4.
    expected = torch.tensor([[0, 0, 10, 20], [4, 5, 40, 30], [2, 3, 3, 4]], dtype=torch.float32)
    assert target["boxes"].dtype == torch.float32
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [11, 14, 7]  # dog, person, cat in VOC_CLASSES order
    assert target["labels"].dtype == torch.int64
    assert target["ignore"].tolist() == [False, True, False]
    assert target["image_id"] == 1
    assert target["orig_size"].tolist() == [30, 40]

    # decimal coordinates ("2.0") are accepted; 2,3,12,13 → 1,2,12,13
    torch.testing.assert_close(ds.load_target(1)["boxes"], torch.tensor([[1.0, 2.0, 12.0, 13.0]]))
    assert ds.load_target(1)["labels"].tolist() == [19]

    empty = ds.load_target(2)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["ignore"].shape == (0,)
    assert ds[2][0].shape == (3, 16, 16)


def test_voc_split_file_overrides_image_set_and_sets_ids_by_position(voc_root: Path, tmp_path: Path) -> None:
    split = tmp_path / "my_split.txt"
    split.write_text("000007\n\n000005\n")
    ds = VOCDetection(voc_root, image_set="does_not_exist", split_file=split)
    assert ds.image_ids == [1, 2]
    assert ds.load_target(0)["orig_size"].tolist() == [24, 20]  # 000007 first
    assert ds.load_target(1)["boxes"].shape == (3, 4)  # 000005 second


def test_voc_custom_classes_relabel(voc_root: Path) -> None:
    ds = VOCDetection(voc_root, classes=["tvmonitor", "person", "dog", "cat"])
    assert ds.category_ids == [1, 2, 3, 4]
    assert ds.load_target(0)["labels"].tolist() == [2, 1, 3]
    assert ds.load_target(1)["labels"].tolist() == [0]


def test_voc_coco_gt_marks_difficult_as_crowd(voc_root: Path) -> None:
    gt = VOCDetection(voc_root).coco_gt()
    assert [img["id"] for img in gt["images"]] == [1, 2, 3]
    assert gt["images"][0] == {"id": 1, "width": 40, "height": 30, "file_name": "000005.jpg"}
    anns = gt["annotations"]
    assert [a["image_id"] for a in anns] == [1, 1, 1, 2]
    assert len({a["id"] for a in anns}) == 4
    # dog: x1y1x2y2 0,0,10,20 → xywh 0,0,10,20; category id = label 11 + 1
    assert anns[0]["bbox"] == [0.0, 0.0, 10.0, 20.0] and anns[0]["category_id"] == 12
    assert anns[0]["area"] == 200.0 and anns[0]["iscrowd"] == 0
    # difficult person: 4,5,40,30 → xywh 4,5,36,25
    assert anns[1]["bbox"] == [4.0, 5.0, 36.0, 25.0] and anns[1]["iscrowd"] == 1
    assert gt["categories"][0] == {"id": 1, "name": "aeroplane"} and len(gt["categories"]) == 20


def test_voc_difficult_neither_rewarded_nor_penalised_by_pycocotools(voc_root: Path) -> None:
    ds = VOCDetection(voc_root)
    gt = ds.coco_gt()

    def det(ann: dict, score: float = 0.9) -> dict:
        return {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": score}

    positives = [det(a) for a in gt["annotations"] if not a["iscrowd"]]
    difficult = [det(a, 0.99) for a in gt["annotations"] if a["iscrowd"]]
    assert len(positives) == 3 and len(difficult) == 1
    assert _summarize_ap(gt, positives) == pytest.approx(1.0)
    # a confident detection on the difficult object is not a false positive
    assert _summarize_ap(gt, positives + difficult) == pytest.approx(1.0)
    # ...whereas one on a *non*-difficult box of another class is (sensitivity check)
    wrong = dict(positives[0], category_id=1, score=0.99)
    false_pos = [wrong, dict(det(gt["annotations"][0]), score=0.5), *positives[1:]]
    assert _summarize_ap(gt, false_pos) < 1.0


def _summarize_ap(gt: dict, detections: list[dict]) -> float:
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(detections)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # AP@0.5 over categories that have ground truth (stats[1]); -1 would mean "no gt"
    return float(evaluator.stats[1])


@pytest.mark.parametrize(
    ("objects", "fragments"),
    [
        ([voc_object("dog", 1, 1, 5, 5), voc_object("unicorn", 1, 1, 5, 5)], ("object 1", "unknown class 'unicorn'")),
        ([voc_object("dog", 20, 1, 10, 5)], ("object 0", "xmax (10) < xmin (20)")),
        ([voc_object("dog", 1, 1, 5, 5), voc_object("dog", 1, 9, 5, 2)], ("object 1", "ymax (2) < ymin (9)")),
        (["<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><ymax>5</ymax></bndbox></object>"], ("object 0", "'xmax'")),
        (["<object><name>dog</name></object>"], ("object 0", "'bndbox'")),
        ([voc_object("dog", "one", 1, 5, 5)], ("object 0", "'xmin'", "not a number")),
    ],
)
def test_voc_bad_annotation_is_data_error_naming_xml(tmp_path: Path, objects: list[str], fragments: tuple[str, ...]) -> None:
    xml = write_voc(tmp_path, "a", width=20, height=20, objects=objects)
    write_split(tmp_path, "train", ["a"])
    with pytest.raises(DataError) as e:
        VOCDetection(tmp_path)
    assert_one_line_error(e, xml, *fragments)


def test_voc_malformed_xml_missing_size_and_missing_files(tmp_path: Path) -> None:
    xml = write_voc(tmp_path, "a", width=20, height=20, objects=[])
    write_split(tmp_path, "train", ["a"])
    xml.write_text("<annotation><size><width>20</width>")  # truncated file
    with pytest.raises(DataError) as e:
        VOCDetection(tmp_path)
    assert_one_line_error(e, xml, "malformed XML")

    xml.write_text("<annotation><filename>a.jpg</filename></annotation>")
    with pytest.raises(DataError) as e:
        VOCDetection(tmp_path)
    assert_one_line_error(e, xml, "'size'")

    write_split(tmp_path, "train", ["a", "missing"])
    write_voc(tmp_path, "a", width=20, height=20, objects=[])
    with pytest.raises(DataError) as e:
        VOCDetection(tmp_path)
    assert_one_line_error(e, tmp_path / "Annotations" / "missing.xml", "annotation not found")

    with pytest.raises(DataError) as e:
        VOCDetection(tmp_path, image_set="val")
    assert_one_line_error(e, tmp_path / "ImageSets" / "Main" / "val.txt", "not found")


def test_voc_missing_corrupt_and_mismatched_images_fail_in_getitem(voc_root: Path) -> None:
    ds = VOCDetection(voc_root)
    (voc_root / "JPEGImages" / "000005.jpg").unlink()
    with pytest.raises(DataError) as e:
        ds[0]
    assert_one_line_error(e, voc_root / "JPEGImages" / "000005.jpg", "image not found")

    corrupt = voc_root / "JPEGImages" / "000007.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:40] + b"garbage" * 10)
    with pytest.raises(DataError) as e:
        ds[1]
    assert_one_line_error(e, corrupt, "cannot decode image")

    write_image(voc_root / "JPEGImages" / "000009.jpg", 17, 16)  # XML says 16x16
    with pytest.raises(DataError) as e:
        ds[2]
    assert_one_line_error(e, voc_root / "JPEGImages" / "000009.jpg", "000009.xml", "16x16")
    # load_target does not touch the image files
    assert ds.load_target(0)["boxes"].shape == (3, 4)


# ---------------------------------------------------------------------------------------------
# COCO


@pytest.fixture()
def coco_files(tmp_path: Path) -> tuple[Path, Path, Path, dict]:
    """Non-contiguous category ids, relative + absolute file names, crowd, empty image, extra fields."""
    image_root = tmp_path / "images"
    write_image(image_root / "sub" / "a.jpg", 30, 40)
    absolute = tmp_path / "elsewhere" / "b.png"
    write_image(absolute, 20, 10, fmt="PNG")
    write_image(image_root / "c.jpg", 8, 8)
    data = {
        "info": {"description": "test"},
        "licenses": [],
        "categories": [  # deliberately out of id order
            {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 5, "name": "airplane", "supercategory": "vehicle"},
        ],
        "images": [
            {"id": 7, "file_name": "sub/a.jpg", "width": 40, "height": 30, "license": 1},
            {"id": 3, "file_name": str(absolute), "width": 10, "height": 20},
            {"id": 11, "file_name": "c.jpg", "width": 8, "height": 8},
        ],
        "annotations": [
            {"id": 100, "image_id": 7, "category_id": 90, "bbox": [1.5, 2, 10, 5], "area": 50.0, "iscrowd": 0, "segmentation": [[1.5, 2, 11.5, 2, 11.5, 7]]},
            {"id": 101, "image_id": 7, "category_id": 1, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 1, "segmentation": {"counts": [0, 1200], "size": [30, 40]}},
            {"id": 102, "image_id": 3, "category_id": 5, "bbox": [2, 3, 4, 5], "area": 20, "iscrowd": 0, "keypoints": [3, 4, 2], "num_keypoints": 1},
            {"id": 103, "image_id": 3, "category_id": 1, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0},  # zero width
            {"id": 104, "image_id": 7, "category_id": 1, "bbox": [20, 10, 5, 6], "area": 30},  # no iscrowd key
        ],
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, image_root, absolute, data


def test_coco_maps_non_contiguous_ids_and_reads_all_images(coco_files) -> None:
    ann_file, image_root, _, _ = coco_files
    ds = COCODetection(ann_file, image_root)
    assert ds.category_ids == [1, 5, 90]  # increasing id order
    assert ds.classes == ["person", "airplane", "toothbrush"]
    assert ds.image_ids == [7, 3, 11]  # json order, empty image kept

    t = ds.load_target(0)
    # xywh → x1y1x2y2: [1.5,2,10,5] → [1.5,2,11.5,7]; crowd [0,0,40,30] → [0,0,40,30]; [20,10,5,6] → [20,10,25,16]
    torch.testing.assert_close(t["boxes"], torch.tensor([[1.5, 2, 11.5, 7], [0, 0, 40, 30], [20, 10, 25, 16]]))
    assert t["labels"].tolist() == [2, 0, 0]
    assert [ds.category_ids[label] for label in t["labels"].tolist()] == [90, 1, 1]
    assert t["ignore"].tolist() == [False, True, False]
    assert t["image_id"] == 7 and t["orig_size"].tolist() == [30, 40]

    t = ds.load_target(1)  # the zero-width box 103 is not a training target
    torch.testing.assert_close(t["boxes"], torch.tensor([[2.0, 3, 6, 8]]))
    assert t["labels"].tolist() == [1] and t["ignore"].tolist() == [False]

    t = ds.load_target(2)
    assert t["boxes"].shape == (0, 4) and t["labels"].dtype == torch.int64 and t["ignore"].dtype == torch.bool

    shapes = [tuple(ds[i][0].shape) for i in range(3)]  # relative, absolute (PNG) and plain file names
    assert shapes == [(3, 30, 40), (3, 20, 10), (3, 8, 8)]


def test_coco_gt_is_a_deep_copy_of_the_json(coco_files) -> None:
    ann_file, image_root, _, data = coco_files
    ds = COCODetection(ann_file, image_root)
    gt = ds.coco_gt()
    assert gt["images"] == data["images"]
    assert gt["annotations"] == data["annotations"]  # including the zero-width box and extra fields
    assert gt["categories"] == data["categories"]
    gt["annotations"][0]["bbox"][0] = -1.0
    gt["images"].clear()
    again = ds.coco_gt()
    assert again["annotations"][0]["bbox"][0] == 1.5 and len(again["images"]) == 3


def test_coco_remove_empty_drops_images_without_positive_boxes(coco_files, tmp_path: Path) -> None:
    ann_file, image_root, _, data = coco_files
    data["images"].append({"id": 12, "file_name": "c.jpg", "width": 8, "height": 8})
    data["annotations"].append({"id": 105, "image_id": 12, "category_id": 5, "bbox": [0, 0, 2, 2], "iscrowd": 1})
    path = tmp_path / "more.json"
    path.write_text(json.dumps(data))
    assert COCODetection(path, image_root).image_ids == [7, 3, 11, 12]
    ds = COCODetection(path, image_root, remove_empty=True)
    assert ds.image_ids == [7, 3]  # 11: no annotation, 12: only a crowd box
    gt = ds.coco_gt()
    assert [img["id"] for img in gt["images"]] == [7, 3]
    assert {a["image_id"] for a in gt["annotations"]} == {7, 3}


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (lambda d: d["annotations"][1].pop("bbox"), ("annotations[1].bbox",)),
        (lambda d: d["images"][2].pop("width"), ("images[2].width",)),
        (lambda d: d.pop("categories"), ("categories",)),
        (lambda d: d["annotations"][2].update(bbox=[12, 3, -4, 5]), ("annotations[2]", "id 102", "w=-4")),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3, -0.5]), ("annotations[0]", "id 100", "h=-0.5")),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), ("annotations[0].bbox",)),
        (lambda d: d["annotations"][0].update(category_id=2), ("annotations[0]", "category_id 2")),
        (lambda d: d["annotations"][0].update(image_id=99), ("annotations[0]", "image_id 99")),
        (lambda d: d["images"].append(dict(d["images"][0])), ("images[3].id 7", "duplicated")),
    ],
)
def test_coco_bad_json_fields_are_data_errors_naming_file_and_field(coco_files, mutate, fragments) -> None:
    ann_file, image_root, _, data = coco_files
    mutate(data)
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        COCODetection(ann_file, image_root)
    assert_one_line_error(e, ann_file, *fragments)


def test_coco_malformed_or_missing_json_and_missing_image(coco_files, tmp_path: Path) -> None:
    ann_file, image_root, absolute, _ = coco_files
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n{"id": 1,,}\n')
    with pytest.raises(DataError) as e:
        COCODetection(bad, image_root)
    assert_one_line_error(e, bad, "malformed JSON")

    bad.write_text("[1, 2]")
    with pytest.raises(DataError) as e:
        COCODetection(bad, image_root)
    assert_one_line_error(e, bad, "top level")

    with pytest.raises(DataError) as e:
        COCODetection(tmp_path / "none.json", image_root)
    assert_one_line_error(e, tmp_path / "none.json", "not found")

    ds = COCODetection(ann_file, image_root)
    absolute.unlink()
    with pytest.raises(DataError) as e:
        ds[1]
    assert_one_line_error(e, absolute, "image not found")


# ---------------------------------------------------------------------------------------------
# transforms


def make_target(boxes: list[list[float]], labels: list[int] | None = None, ignore: list[bool] | None = None) -> dict:
    n = len(boxes)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels if labels is not None else list(range(n)), dtype=torch.int64),
        "ignore": torch.tensor(ignore if ignore is not None else [False] * n, dtype=torch.bool),
        "image_id": 1,
    }


@pytest.mark.parametrize(
    ("hw", "min_size", "max_size", "expected"),
    [
        # 100x300, 800/1333: 3*800 = 2400 > 1333 → short = round(1333*100/300) = round(444.33) = 444,
        # long = int(444*300/100) = 1332
        ((100, 300), 800, 1333, (444, 1332)),
        ((300, 100), 800, 1333, (1332, 444)),
        # rounding, as the reference: 1000*300/700 = 428.57 → 429 (not 428); long int(429*700/300) = 1001
        ((300, 700), 800, 1000, (429, 1001)),
        # 600x800: 800*800/600 = 1066.7 <= 1333 → short 800, long int(1066.67) = 1066
        ((600, 800), 800, 1333, (800, 1066)),
        ((800, 1000), 800, 1333, (800, 1000)),  # already the right size: unchanged
        # proxy task: short side 384, no cap: 480x640 → 384x512
        ((480, 640), 384, 10**9, (384, 512)),
        ((375, 500), 384, None, (384, 512)),  # 384*500/375 = 512.0
        ((50, 50), 800, 1333, (800, 800)),
    ],
)
def test_resize_rule(hw, min_size, max_size, expected) -> None:
    assert resized_hw(*hw, min_size, max_size) == expected


def test_resize_scales_image_and_boxes_and_accumulates_scale() -> None:
    image = torch.zeros(3, 100, 300, dtype=torch.uint8)
    image[:, 10:50, 30:60] = 255
    out, t = Resize(800, 1333)(image, make_target([[30, 10, 60, 50]]))
    assert out.shape == (3, 444, 1332) and out.dtype == torch.uint8
    # sy = 444/100 = 4.44, sx = 1332/300 = 4.44 → [133.2, 44.4, 266.4, 222]
    torch.testing.assert_close(t["boxes"], torch.tensor([[133.2, 44.4, 266.4, 222.0]]))
    torch.testing.assert_close(t["scale"], torch.tensor([4.44, 4.44]))
    # the bright block moved with the box
    assert out[0, 100, 200] == 255 and out[0, 20, 200] == 0 and out[0, 100, 100] == 0

    # a second resize multiplies: 444x1332 → short 222 (cap 1000: 3*222 = 666 ok) → 222x666
    out2, t2 = Resize(222, 1000)(out, t)
    assert out2.shape == (3, 222, 666)
    torch.testing.assert_close(t2["scale"], torch.tensor([2.22, 2.22]))
    torch.testing.assert_close(t2["boxes"], torch.tensor([[66.6, 22.2, 133.2, 111.0]]))

    # non-uniform ratios: 3x7 → short 5: long int(5*7/3) = 11 → sy = 5/3, sx = 11/7
    _, t3 = Resize(5, None)(torch.zeros(3, 3, 7, dtype=torch.uint8), make_target([[7, 3, 7, 3]]))
    torch.testing.assert_close(t3["boxes"], torch.tensor([[11.0, 5.0, 11.0, 5.0]]))
    torch.testing.assert_close(t3["scale"], torch.tensor([5 / 3, 11 / 7]))


def test_resize_multiscale_draws_from_min_sizes_with_torch_rng() -> None:
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    resize = Resize((16, 24, 32), None)

    def sizes() -> list[int]:
        return [resize(image, make_target([]))[0].shape[1] for _ in range(30)]

    torch.manual_seed(0)
    first = sizes()
    torch.manual_seed(0)
    assert sizes() == first
    assert set(first) == {16, 24, 32}


def test_horizontal_flip_box_arithmetic() -> None:
    image = torch.arange(3 * 4 * 100, dtype=torch.float32).reshape(3, 4, 100)
    target = make_target([[10, 20, 30, 40], [0, 0, 100, 4]])
    out, t = RandomHorizontalFlip(p=1.0)(image, target)
    # W = 100: x1' = 100 - x2, x2' = 100 - x1
    torch.testing.assert_close(t["boxes"], torch.tensor([[70.0, 20, 90, 40], [0, 0, 100, 4]]))
    assert torch.equal(out[:, :, 0], image[:, :, 99]) and torch.equal(out[:, :, 99], image[:, :, 0])
    assert torch.equal(target["boxes"], torch.tensor([[10.0, 20, 30, 40], [0, 0, 100, 4]]))  # input untouched
    back, t2 = RandomHorizontalFlip(p=1.0)(out, t)
    assert torch.equal(back, image) and torch.equal(t2["boxes"], target["boxes"])
    same, t3 = RandomHorizontalFlip(p=0.0)(image, target)
    assert torch.equal(same, image) and torch.equal(t3["boxes"], target["boxes"])


def test_random_crop_shifts_clips_and_drops_boxes() -> None:
    image = torch.arange(3 * 50 * 200, dtype=torch.float32).reshape(3, 50, 200)
    boxes = [[0, 10, 20, 30], [100, 0, 130, 50], [180, 5, 200, 45], [60, 0, 60.5, 50]]
    target = make_target(boxes, labels=[0, 1, 2, 0], ignore=[False, True, False, False])
    crop = RandomCrop(50)
    seen_drop = seen_clip = False
    torch.manual_seed(0)
    for _ in range(60):
        out, t = crop(image, target)
        x0, y0, x1, y1 = t["crop"].tolist()
        assert y0 == 0 and y1 == 50 and x1 - x0 == 50 and 0 <= x0 <= 150  # height fits: whole dim
        assert torch.equal(out, image[:, :, x0:x1])
        expected, kept = [], []
        for i, (bx1, by1, bx2, by2) in enumerate(boxes):
            cx1, cx2 = min(max(bx1 - x0, 0), 50), min(max(bx2 - x0, 0), 50)
            if cx2 > cx1:
                expected.append([cx1, by1, cx2, by2])
                kept.append(i)
        torch.testing.assert_close(t["boxes"], torch.tensor(expected, dtype=torch.float32).reshape(-1, 4))
        assert t["labels"].tolist() == [[0, 1, 2, 0][i] for i in kept]
        assert t["ignore"].tolist() == [[False, True, False, False][i] for i in kept]
        seen_drop |= len(kept) < 4
        seen_clip |= any(e[0] == 0 or e[2] == 50 for e in expected)
    assert seen_drop and seen_clip


def test_random_crop_smaller_image_is_kept_whole() -> None:
    image = torch.ones(3, 20, 30, dtype=torch.uint8)
    out, t = RandomCrop(384)(image, make_target([[1, 2, 3, 4]]))
    assert out.shape == (3, 20, 30)
    assert t["crop"].tolist() == [0, 0, 30, 20]
    assert t["boxes"].tolist() == [[1, 2, 3, 4]]


def test_normalize_uses_imagenet_constants() -> None:
    image = torch.zeros(3, 2, 2, dtype=torch.uint8)
    image[:, 0, 0] = 255
    out, _ = Normalize()(image, {})
    assert out.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[:, 0, 0], (1 - mean) / std)
    torch.testing.assert_close(out[:, 1, 1], -mean / std)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_collate_pads_bottom_right_to_multiple_of_32() -> None:
    a = torch.rand(3, 50, 70) + 1
    b = torch.rand(3, 64, 33) + 1
    images, targets = collate([(a, {"image_id": 1}), (b, {"image_id": 2})])
    assert images.shape == (2, 3, 64, 96)  # max(50, 64) = 64 → 64; max(70, 33) = 70 → 96
    assert torch.equal(images[0, :, :50, :70], a) and torch.equal(images[1, :, :64, :33], b)
    assert images[0, :, 50:].abs().sum() == 0 and images[0, :, :, 70:].abs().sum() == 0
    assert images[1, :, :, 33:].abs().sum() == 0
    assert [t["size"].tolist() for t in targets] == [[50, 70], [64, 33]]
    assert [t["image_id"] for t in targets] == [1, 2]
    assert collate([(a, {}), (b, {})], size_divisible=1)[0].shape == (2, 3, 64, 70)
    assert collate([(torch.rand(3, 33, 31), {})])[0].shape == (1, 3, 64, 32)


def test_build_transforms_train_and_eval() -> None:
    image = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    target = make_target([[0, 0, 90, 60], [10, 10, 20, 20]])
    train = build_transforms(train=True, min_size=48, max_size=10**9, crop=32)
    assert [type(t) for t in train.transforms] == [Resize, RandomHorizontalFlip, RandomCrop, Normalize]
    torch.manual_seed(1)
    out, t = train(image, target)
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    assert t["scale"].tolist() == [0.800000011920929, 0.800000011920929]  # 60x90 → 48x72
    assert set(t) >= {"boxes", "labels", "ignore", "scale", "crop"}

    evaluate = build_transforms(train=False, min_size=48, max_size=1333)
    assert [type(t) for t in evaluate.transforms] == [Resize, Normalize]
    out1, t1 = evaluate(image, target)
    out2, _ = evaluate(image, target)
    assert out1.shape == (3, 48, 72) and torch.equal(out1, out2) and "crop" not in t1
    assert isinstance(build_transforms(train=True, flip=False), Compose)
    assert [type(t) for t in build_transforms(train=True, flip=False).transforms] == [Resize, Normalize]


# ---------------------------------------------------------------------------------------------
# synthetic data


def _tree_bytes(root: Path, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix in suffixes}


def test_synthetic_is_deterministic_given_seed(tmp_path: Path) -> None:
    kwargs = dict(num_train=6, num_val=3, max_objects=3)
    make_synthetic(tmp_path / "a", seed=3, **kwargs)
    make_synthetic(tmp_path / "b", seed=3, **kwargs)
    make_synthetic(tmp_path / "c", seed=4, **kwargs)
    a = _tree_bytes(tmp_path / "a", (".json", ".xml", ".txt", ".jpg"))
    assert len(a) == 2 + 9 + 2 + 9
    assert a == _tree_bytes(tmp_path / "b", (".json", ".xml", ".txt", ".jpg"))
    c = _tree_bytes(tmp_path / "c", (".json", ".xml", ".txt", ".jpg"))
    assert a.keys() == c.keys() and a["annotations/instances_train.json"] != c["annotations/instances_train.json"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    return make_synthetic(tmp_path_factory.mktemp("syn"), num_train=24, num_val=6, image_size=(96, 128), seed=1)


def test_synthetic_voc_and_coco_describe_the_same_boxes(synthetic: dict) -> None:
    assert synthetic["classes"] == ["circle", "square", "triangle"]
    for split, count in (("train", 24), ("val", 6)):
        voc = VOCDetection(synthetic["voc_root"], image_set=split, classes=synthetic["classes"])
        coco = COCODetection(synthetic[f"{split}_json"], synthetic["image_root"])
        assert len(voc) == len(coco) == count and voc.image_ids == coco.image_ids
        assert voc.classes == coco.classes and voc.category_ids == coco.category_ids == [1, 2, 3]
        n_boxes = 0
        for i in range(count):
            tv, tc = voc.load_target(i), coco.load_target(i)
            torch.testing.assert_close(tv["boxes"], tc["boxes"], rtol=0, atol=0)
            assert torch.equal(tv["labels"], tc["labels"]) and torch.equal(tv["orig_size"], tc["orig_size"])
            assert not tv["ignore"].any()
            assert 1 <= len(tv["boxes"]) <= 4
            h, w = tv["orig_size"].tolist()
            assert 96 <= h <= 128 and 96 <= w <= 128
            b = tv["boxes"]
            assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
            assert ((b[:, 2:] - b[:, :2]) >= 4).all()
            n_boxes += len(b)
        # both loaders' evaluation ground truth agree too
        gv, gc = voc.coco_gt(), coco.coco_gt()
        assert [a["bbox"] for a in gv["annotations"]] == [a["bbox"] for a in gc["annotations"]]
        assert [a["category_id"] for a in gv["annotations"]] == [a["category_id"] for a in gc["annotations"]]
        assert len(gv["annotations"]) == n_boxes
        image, target = voc[0]
        assert image.shape[1:] == tuple(target["orig_size"].tolist())
        image, target = coco[count - 1]
        assert image.shape[1:] == tuple(target["orig_size"].tolist())


def test_synthetic_boxes_are_tight_around_the_drawn_shape(synthetic: dict) -> None:
    ds = VOCDetection(synthetic["voc_root"], image_set="train", classes=synthetic["classes"])
    checked = 0
    for i in range(len(ds)):
        target = ds.load_target(i)
        if len(target["boxes"]) != 1:
            continue
        image = ds[i][0].permute(1, 2, 0).float()  # (H, W, 3)
        background = image.reshape(-1, 3).median(dim=0).values
        salient = (image - background).norm(dim=-1) > 60  # objects differ from the base by >= 110
        rows = torch.nonzero(salient.any(dim=1)).flatten()
        cols = torch.nonzero(salient.any(dim=0)).flatten()
        found = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
        # JPEG ringing may blur the edge by a pixel
        torch.testing.assert_close(found, target["boxes"][0], rtol=0, atol=1.0)
        checked += 1
    assert checked >= 3


def test_synthetic_feeds_a_dataloader(synthetic: dict) -> None:
    ds = COCODetection(synthetic["train_json"], synthetic["image_root"], transforms=build_transforms(train=True, min_size=64, crop=64))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    torch.manual_seed(0)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert [t["image_id"] for t in targets] == ds.image_ids[:4]
    assert all(t["size"].tolist() == [64, 64] for t in targets)
