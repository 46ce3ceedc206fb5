"""VOC AP (devkit rules) on hand-computed cases, and where it differs from COCOeval."""

import copy
import math

import numpy as np
import pytest

from nasfcos.evaluation.coco import coco_evaluate
from nasfcos.evaluation.voc import _iou, _xyxy, average_precision, voc_evaluate


def _gt(*anns, categories=((1, "cat"),), images=(1,)):
    """COCO gt dict; each ann is (image_id, category_id, x1, y1, x2, y2, difficult)."""
    return {
        "images": [{"id": i, "width": 200, "height": 200} for i in images],
        "categories": [{"id": c, "name": n} for c, n in categories],
        "annotations": [
            {"id": k + 1, "image_id": im, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1],
             "area": float((x2 - x1) * (y2 - y1)), "iscrowd": int(diff)}
            for k, (im, c, x1, y1, x2, y2, diff) in enumerate(anns)
        ],
    }  # fmt: skip


def _det(score, x1, y1, x2, y2, image_id=1, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


NORMAL = (1, 1, 0, 0, 10, 10, False)  # 10x10 at the origin
DIFFICULT = (1, 1, 50, 50, 100, 100, True)  # 50x50, area 2500


def test_detection_inside_difficult_box_is_a_false_positive_not_ignored():
    """The issue's case: COCOeval forgives it (AP50 1.0), VOC counts it (AP 0.5)."""
    gt = _gt(NORMAL, DIFFICULT)
    # Ranked first: 20x20 inside the difficult box. IoU = 400 / 2500 = 0.16 < 0.5 -> VOC FP;
    # COCOeval's crowd overlap = intersection / det area = 400 / 400 = 1 -> ignored.
    # Ranked second: exactly the normal box -> TP for both.
    dets = [_det(0.9, 60, 60, 80, 80), _det(0.8, 0, 0, 10, 10)]
    assert coco_evaluate(gt, dets)["AP50"] == pytest.approx(1.0)
    # VOC: rank 1 FP (P 0, R 0), rank 2 TP (P 1/2, R 1) -> envelope 0.5 over recall [0, 1]
    # -> all-point AP 0.5; 11-point: best precision at every threshold is 0.5 -> 0.5.
    for use_07 in (False, True):
        m = voc_evaluate(gt, dets, use_07_metric=use_07)
        assert m["VOC_mAP50"] == pytest.approx(0.5)
        assert m["VOC_AP50_per_class"] == {"cat": pytest.approx(0.5)}


def test_detection_matching_difficult_box_is_ignored():
    gt = _gt(NORMAL, DIFFICULT)
    # Ranked first: [50, 50, 90, 100], IoU with the difficult box = 2000 / 2500 = 0.8 -> ignored,
    # neither TP nor FP; then the TP: precision 1 at recall 1 -> AP 1. Counted as an FP it
    # would give 0.5, as in the test above.
    dets = [_det(0.9, 50, 50, 90, 100), _det(0.8, 0, 0, 10, 10)]
    assert voc_evaluate(gt, dets)["VOC_mAP50"] == pytest.approx(1.0)
    # Difficult boxes are not in recall's denominator: the difficult match alone gives no recall
    # (1 non-difficult gt, 0 TP) -> AP 0, not 1.
    assert voc_evaluate(gt, dets[:1])["VOC_mAP50"] == pytest.approx(0.0)


def test_duplicate_detection_is_a_false_positive():
    gt = _gt(NORMAL)
    # Both match the single gt (IoU 1 and 0.81); the higher-scored one takes it, the second is a
    # duplicate -> FP. Ranks: TP (P 1, R 1), FP (P 1/2, R 1): envelope 1 over [0, 1] -> AP 1.
    dets = [_det(0.9, 0, 0, 10, 10), _det(0.8, 0, 0, 9, 9)]
    assert voc_evaluate(gt, dets)["VOC_mAP50"] == pytest.approx(1.0)
    # Scored above the detection of a second gt, the duplicate costs precision:
    gt2 = _gt(NORMAL, (1, 1, 100, 100, 110, 110, False))
    dets2 = [_det(0.9, 0, 0, 10, 10), _det(0.8, 0, 0, 9, 9), _det(0.7, 100, 100, 110, 110)]
    # TP (P 1, R 1/2), FP (P 1/2, R 1/2), TP (P 2/3, R 1): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert voc_evaluate(gt2, dets2)["VOC_mAP50"] == pytest.approx(5 / 6)


def test_iou_exactly_one_half_matches_as_in_the_devkit():
    """VOCevaldet.m matches at ``ovmax >= VOCopts.minoverlap`` (the released NAS-FCOS code's
    chainercv evaluation too: unmatched only below the threshold); py-faster-rcnn's Python
    port has ``ovmax > ovthresh``, which would make these false positives."""
    # Continuous boxes (no devkit +1): every area and ratio below is exact in binary floating point.
    wide = (1, 1, 0, 0, 30, 10, False)  # area 300
    tall = _det(0.9, 0, 0, 10, 20)  # vs NORMAL: intersection 100, union 200
    shifted = _det(0.9, 10, 0, 40, 10)  # vs wide: intersection 200, union 400
    for gt_box, det in ((NORMAL, tall), (wide, shifted)):
        assert _iou(_xyxy([det["bbox"]]), _xyxy([_gt(gt_box)["annotations"][0]["bbox"]]))[0, 0] == 0.5
        assert voc_evaluate(_gt(gt_box), [det])["VOC_mAP50"] == 1.0  # a TP
        # just below one half: a false positive
        below = _det(0.9, det["bbox"][0], 0, det["bbox"][0] + det["bbox"][2] + 0.5, det["bbox"][3])
        assert _iou(_xyxy([below["bbox"]]), _xyxy([_gt(gt_box)["annotations"][0]["bbox"]]))[0, 0] < 0.5
        assert voc_evaluate(_gt(gt_box), [below])["VOC_mAP50"] == 0.0
    # A difficult box matched at exactly one half ignores the detection (AP 1, not 1/2).
    difficult_tall = (1, 1, 50, 50, 60, 60, True)
    dets = [_det(0.9, 50, 50, 60, 70), _det(0.8, 0, 0, 10, 10)]
    assert voc_evaluate(_gt(NORMAL, difficult_tall), dets)["VOC_mAP50"] == 1.0


def test_eleven_point_and_all_point_ap_on_a_known_curve():
    # Ranks TP, FP, TP against 2 gts: recall [1/2, 1/2, 1], precision [1, 1/2, 2/3].
    recall, precision = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    # All-point: envelope 1 on (0, 1/2], 2/3 on (1/2, 1] -> 1/2 + 1/3 = 5/6.
    assert average_precision(recall, precision) == pytest.approx(5 / 6)
    # 11-point: t = 0 .. 0.5 (6 points) -> 1, t = 0.6 .. 1 (5 points) -> 2/3: (6 + 10/3) / 11 = 28/33.
    assert average_precision(recall, precision, use_07_metric=True) == pytest.approx(28 / 33)
    # The same curve from detections (the FP is a box far from both gts).
    gt = _gt(NORMAL, (1, 1, 100, 100, 110, 110, False))
    dets = [_det(0.9, 0, 0, 10, 10), _det(0.8, 150, 150, 160, 160), _det(0.7, 100, 100, 110, 110)]
    assert voc_evaluate(gt, dets)["VOC_mAP50"] == pytest.approx(5 / 6)
    assert voc_evaluate(gt, dets, use_07_metric=True)["VOC_mAP50"] == pytest.approx(28 / 33)
    # Recall exactly 3/10 counts at the 0.3 threshold (np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004).
    assert average_precision(np.array([0.3]), np.array([1.0]), use_07_metric=True) == pytest.approx(4 / 11)


def test_classes_without_gt_are_reported_and_left_out_of_the_mean():
    cats = ((1, "cat"), (2, "dog"), (3, "cow"))
    gt = _gt(NORMAL, (1, 3, 50, 50, 100, 100, True), categories=cats)  # dog: no gt; cow: only difficult
    dets = [_det(0.9, 0, 0, 10, 10), _det(0.5, 0, 0, 10, 10, category_id=2), _det(0.4, 50, 50, 100, 100, category_id=3)]
    m = voc_evaluate(gt, dets)
    assert m["VOC_AP50_per_class"] == {"cat": pytest.approx(1.0), "dog": None, "cow": None}
    assert m["VOC_mAP50"] == pytest.approx(1.0)  # mean over cat only, not (1 + 0 + 0) / 3
    assert math.isnan(voc_evaluate(_gt(DIFFICULT), dets[:1])["VOC_mAP50"])


def test_empty_detections_and_no_mutation():
    gt = _gt(NORMAL, DIFFICULT, (2, 1, 0, 0, 20, 20, False), images=(1, 2))
    assert voc_evaluate(gt, []) == {"VOC_mAP50": 0.0, "VOC_AP50_per_class": {"cat": 0.0}}
    assert voc_evaluate(gt, [], use_07_metric=True)["VOC_mAP50"] == 0.0
    dets = [_det(0.9, 0, 0, 10, 10), _det(0.9, 0, 0, 20, 20, image_id=2)]
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    assert voc_evaluate(gt, dets)["VOC_mAP50"] == pytest.approx(1.0)  # matching is per image
    assert gt == gt_before and dets == dets_before


def test_equal_scores_keep_the_results_order():
    gt = _gt(NORMAL, (1, 1, 100, 100, 110, 110, False))
    fp, tp1, tp2 = _det(0.5, 150, 150, 160, 160), _det(0.5, 0, 0, 10, 10), _det(0.5, 100, 100, 110, 110)
    # FP, TP, TP: P [0, 1/2, 2/3], R [0, 1/2, 1] -> envelope 2/3 over [0, 1] -> 2/3.
    assert voc_evaluate(gt, [fp, tp1, tp2])["VOC_mAP50"] == pytest.approx(2 / 3)
    # TP, TP, FP: precision 1 up to recall 1 -> 1.
    assert voc_evaluate(gt, [tp1, tp2, fp])["VOC_mAP50"] == pytest.approx(1.0)


def test_unknown_image_or_category_is_an_error():
    with pytest.raises(ValueError, match="image ids not in the ground truth"):
        voc_evaluate(_gt(NORMAL), [_det(1.0, 0, 0, 1, 1, image_id=99)])
    with pytest.raises(ValueError, match="category ids not in the ground truth: \\[5\\]"):
        voc_evaluate(_gt(NORMAL), [_det(1.0, 0, 0, 1, 1, category_id=5)])
