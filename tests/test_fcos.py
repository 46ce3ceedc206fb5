"""FCOS core: points, target assignment, losses, post-processing."""

import math

import pytest
import torch
from torch import nn
from torchvision.models.detection import FCOS as TorchvisionFCOS

from nasfcos.model.fcos import FCOS, Assigned, centerness_target, flatten_outputs, iou_loss

# A 128x128 input: P3..P7 maps of 16, 8, 4, 2, 1 cells.
SHAPES_128 = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def _point_index(points, level, x, y):
    """Index of the point at image coords (x, y) on level (0 = P3)."""
    start = sum(points.level_sizes[:level])
    sel = (points.xy[start : start + points.level_sizes[level]] == torch.tensor([x, y], dtype=torch.float32)).all(1)
    (idx,) = torch.nonzero(sel).flatten().tolist()
    return start + idx


def test_points_are_cell_centres():
    fcos = FCOS(num_classes=3)
    pts = fcos.points(SHAPES_128)
    assert pts.level_sizes == (256, 64, 16, 4, 1)
    # P3 first cell centre: 0*8 + 8//2 = 4; second cell along x: 12; row-major (y outer).
    assert pts.xy[0].tolist() == [4.0, 4.0]
    assert pts.xy[1].tolist() == [12.0, 4.0]
    assert pts.xy[16].tolist() == [4.0, 12.0]
    # P7 (stride 128) single cell centre 64.
    assert pts.xy[-1].tolist() == [64.0, 64.0]
    assert pts.stride[-1].item() == 128.0


def _hand_targets():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 40.0, 40.0],  # A, area 1600
            [10.0, 10.0, 30.0, 30.0],  # B, area 400, inside A
            [0.0, 0.0, 120.0, 100.0],  # C, large: belongs to P4
            [90.0, 0.0, 128.0, 30.0],  # D, ignored (difficult/crowd)
        ]
    )
    return [{"boxes": boxes, "labels": torch.tensor([0, 1, 2, 1]), "ignore": torch.tensor([False, False, False, True])}]


def test_assign_paper_hand_computed():
    fcos = FCOS(num_classes=3, variant="paper")
    pts = fcos.points(SHAPES_128)
    a = fcos.assign(pts, _hand_targets())
    lab, ltrb = a.labels[0], a.ltrb[0]
    # P3 (4,4): A gives ltrb (4,4,36,36), max 36 in [0,64]; B: 4-10<0 outside; C: max 116 > 64.
    i = _point_index(pts, 0, 4, 4)
    assert lab[i] == 0 and ltrb[i].tolist() == [4, 4, 36, 36]
    # P3 (12,12): A (12,12,28,28) and B (2,2,18,18) both valid -> smaller area B wins.
    i = _point_index(pts, 0, 12, 12)
    assert lab[i] == 1 and ltrb[i].tolist() == [2, 2, 18, 18]
    # P3 (44,44): outside A and B; C max = 120-44 = 76 > 64 -> background.
    i = _point_index(pts, 0, 44, 44)
    assert lab[i] == -1 and ltrb[i].tolist() == [0, 0, 0, 0]
    # P4 (8,8): C gives (8,8,112,92), max 112 in [64,128]; A's max 32 < 64 -> C.
    i = _point_index(pts, 1, 8, 8)
    assert lab[i] == 2 and ltrb[i].tolist() == [8, 8, 112, 92]
    # P4 (56,56): C gives (56,56,64,44): max 64 on the boundary, inclusive in the paper variant.
    i = _point_index(pts, 1, 56, 56)
    assert lab[i] == 2
    # P3 (108,12): only inside D, which is ignored -> background.
    i = _point_index(pts, 0, 108, 12)
    assert lab[i] == -1
    # P5 (16,16): C max 104 not in [128, 256].
    assert lab[_point_index(pts, 2, 16, 16)] == -1


def test_assign_torchvision_boundaries_and_centre_sampling():
    fcos = FCOS(num_classes=3, variant="torchvision")
    pts = fcos.points(SHAPES_128)
    lab = fcos.assign(pts, _hand_targets()).labels[0]
    # P4 (56,56): max 64 is not strictly > 64 -> background in the torchvision variant.
    assert lab[_point_index(pts, 1, 56, 56)] == -1
    # P3 (4,4) for A: centre (20,20), |4-20| = 16 >= 1.5*8 = 12 -> outside centre region.
    assert lab[_point_index(pts, 0, 4, 4)] == -1
    # P3 (20,20): B centre (20,20) distance 0 -> B (smaller than A).
    assert lab[_point_index(pts, 0, 20, 20)] == 1
    # P4 (56,40): C centre (60,50): dx 4, dy 10 < 24; ltrb (56,40,64,60) max 64 -> not > 64.
    assert lab[_point_index(pts, 1, 56, 40)] == -1
    # P4 (72,56): ltrb (72,56,48,44): max 72 in (64,128), within 24 of centre -> C.
    assert lab[_point_index(pts, 1, 72, 56)] == 2


def test_assign_image_without_boxes():
    fcos = FCOS(num_classes=3)
    pts = fcos.points(SHAPES_128)
    a = fcos.assign(pts, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    assert (a.labels == -1).all() and (a.ltrb == 0).all()


def test_iou_loss_and_centerness_hand_computed():
    # Identical 2x2 boxes around the point: I = U = 4 -> -log(5/5) = 0.
    t = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert iou_loss(t, t).item() == pytest.approx(0.0)
    # pred 4x4 vs target 2x2, same centre: I = 4, U = 16 -> -log(5/17).
    assert iou_loss(torch.tensor([[2.0, 2.0, 2.0, 2.0]]), t).item() == pytest.approx(-math.log(5 / 17))
    # ltrb (4,4,36,36): sqrt(4/36 * 4/36) = 1/9.
    assert centerness_target(torch.tensor([4.0, 4.0, 36.0, 36.0])).item() == pytest.approx(1 / 9)


def _random_problem(seed: int, K: int = 5):
    g = torch.Generator().manual_seed(seed)
    shapes = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]  # a 256x320 input
    targets = []
    for m in (3, 5):
        xy = torch.rand(m, 2, generator=g) * torch.tensor([240.0, 200.0])
        wh = 8 + torch.rand(m, 2, generator=g) * 250
        boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([320.0, 256.0]))], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, K, (m,), generator=g)})
    P = sum(h * w for h, w in shapes)
    cls = torch.randn(2, P, K, generator=g)
    reg = torch.rand(2, P, 4, generator=g) * 4  # >= 0: torchvision's head applies relu before the loss
    ctr = torch.randn(2, P, generator=g)
    return shapes, targets, cls, reg, ctr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torchvision_variant_equals_torchvision_compute_loss(seed):
    K = 5
    shapes, targets, cls, reg, ctr = _random_problem(seed, K)
    fcos = FCOS(num_classes=K, variant="torchvision")
    pts = fcos.points(shapes)
    assigned = fcos.assign(pts, targets)
    assert (assigned.labels >= 0).sum() > 20  # a meaningful number of positives
    ours = fcos.loss_flat(cls, reg, ctr, pts, assigned)

    backbone = nn.Identity()
    backbone.out_channels = 32
    tv = TorchvisionFCOS(backbone, num_classes=K)
    half = pts.stride[:, None] / 2
    anchors = torch.cat([pts.xy - half, pts.xy + half], 1)  # square anchors of side = stride at our points
    head_outputs = {"cls_logits": cls, "bbox_regression": reg, "bbox_ctrness": ctr[..., None]}
    theirs = tv.compute_loss(targets, head_outputs, [anchors, anchors], list(pts.level_sizes))
    assert ours["cls"].item() == pytest.approx(theirs["classification"].item(), abs=1e-4, rel=1e-5)
    assert ours["reg"].item() == pytest.approx(theirs["bbox_regression"].item(), abs=1e-4, rel=1e-5)
    assert ours["ctr"].item() == pytest.approx(theirs["bbox_ctrness"].item(), abs=1e-4, rel=1e-5)


def test_paper_loss_zero_regression_when_prediction_is_exact():
    shapes, targets, cls, _, ctr = _random_problem(3)
    fcos = FCOS(num_classes=5, variant="paper")
    pts = fcos.points(shapes)
    a = fcos.assign(pts, targets)
    reg = torch.where(a.ltrb > 0, a.ltrb.clamp(min=1e-6).log(), torch.zeros_like(a.ltrb))  # exp(1 * x) = target
    losses = fcos.loss_flat(cls, reg, ctr, pts, a)
    assert losses["reg"].item() == pytest.approx(0.0, abs=1e-5)
    # A wrong prediction costs more, and gradients reach the per-level scales.
    losses = fcos.loss_flat(cls, reg + 0.5, ctr, pts, a)
    assert losses["reg"].item() > 0.1
    losses["reg"].backward()
    assert fcos.scales.grad is not None and fcos.scales.grad.abs().sum() > 0


def test_paper_loss_normalisation():
    """cls: focal sum / (#pos + #images), as the 2019 reference; ctr: BCE mean over
    positives; reg: centerness-weighted mean."""
    shapes, targets, cls, reg, ctr = _random_problem(4)
    fcos = FCOS(num_classes=5, variant="paper")
    pts = fcos.points(shapes)
    a = fcos.assign(pts, targets)
    out = fcos.loss_flat(cls, reg, ctr, pts, a)
    pos = a.labels >= 0
    onehot = torch.zeros_like(cls)
    onehot[pos, a.labels[pos]] = 1
    p = torch.sigmoid(cls)
    pt = p * onehot + (1 - p) * (1 - onehot)
    at = 0.25 * onehot + 0.75 * (1 - onehot)
    focal = (-at * (1 - pt) ** 2 * torch.log(pt)).sum() / (pos.sum() + 2)  # 2 images
    assert out["cls"].item() == pytest.approx(focal.item(), rel=1e-4)
    w = centerness_target(a.ltrb[pos])
    ctr_ref = torch.nn.functional.binary_cross_entropy_with_logits(ctr[pos], w)
    assert out["ctr"].item() == pytest.approx(ctr_ref.item(), rel=1e-5)
    reg_ref = (iou_loss(torch.exp(reg[pos]), a.ltrb[pos]) * w).sum() / w.sum()
    assert out["reg"].item() == pytest.approx(reg_ref.item(), rel=1e-5)


def test_paper_cls_normaliser_counts_images_torchvision_does_not():
    """A hand-sized case: 2 images, one 16x16 box at the origin in the first: 4 positive P3
    points (4,4), (12,4), (4,12), (12,12) (max distance 12, within 0-64 and the centre radius)
    -> paper divides the focal sum by 4 + 2 = 6, torchvision by 4; whole-dataset sums
    normalise the same way."""
    shapes = SHAPES_128
    target = [{"boxes": torch.tensor([[0.0, 0.0, 16.0, 16.0]]), "labels": torch.tensor([0])}, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    for variant, denom in (("paper", 6.0), ("torchvision", 4.0)):
        fcos = FCOS(num_classes=2, variant=variant)
        pts = fcos.points(shapes)
        a = fcos.assign(pts, target)
        num_pos = int((a.labels >= 0).sum())
        P = pts.xy.shape[0]
        cls, reg, ctr = torch.zeros(2, P, 2), torch.zeros(2, P, 4), torch.zeros(2, P)
        sums = fcos.loss_sums(cls, reg, ctr, pts, a)
        expected = sums["cls"] / (num_pos + 2 if variant == "paper" else num_pos)
        assert fcos.combine(sums)["cls"].item() == pytest.approx(expected.item(), rel=1e-6)
        assert num_pos == 4 and sums["cls_norm"].item() == denom
        # accumulating two halves gives the whole-batch result
        halves = [fcos.loss_sums(cls[i : i + 1], reg[i : i + 1], ctr[i : i + 1], pts, Assigned(a.labels[i : i + 1], a.ltrb[i : i + 1])) for i in range(2)]
        total = {k: halves[0][k] + halves[1][k] for k in halves[0]}
        assert fcos.combine(total)["cls"].item() == pytest.approx(fcos.combine(sums)["cls"].item(), rel=1e-6)


def test_loss_without_positives_is_finite_and_differentiable():
    fcos = FCOS(num_classes=3)
    outputs = [(torch.randn(1, 3, h, w, requires_grad=True), torch.randn(1, 4, h, w, requires_grad=True), torch.randn(1, 1, h, w, requires_grad=True)) for h, w in SHAPES_128]
    losses = fcos.loss(outputs, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert losses["reg"].item() == 0.0 and losses["ctr"].item() == 0.0


def _single_detection_outputs(K=3):
    """Outputs of a 128x128 image where only P3 cells (20,20) [class 1] and (28,20) [class 1] and (20,28)
    [class 2] fire, all predicting ltrb = (10,10,10,10) px via exp(log 10)."""
    outs = []
    for lvl, (h, w) in enumerate(SHAPES_128):
        cls = torch.full((1, K, h, w), -10.0)
        reg = torch.full((1, 4, h, w), math.log(10.0))
        ctr = torch.full((1, 1, h, w), 5.0)
        if lvl == 0:
            cls[0, 1, 2, 2] = 3.0  # point (20, 20)
            cls[0, 1, 2, 3] = 2.0  # point (28, 20): box (18,10,38,30), IoU with (10,10,30,30) = 240/560 < 0.6
            cls[0, 1, 3, 2] = 1.0  # point (20, 28)
            cls[0, 2, 3, 2] = 4.0  # same point, class 2
            cls[0, 0, 0, 0] = -2.5  # sigmoid 0.076 > 0.05 but clipped box at the corner
        outs.append((cls, reg, ctr))
    return outs


def test_postprocess_scores_nms_and_clipping():
    fcos = FCOS(num_classes=3)
    dets = fcos.postprocess(_single_detection_outputs(), [(128, 128)])[0]
    rows = {(round(s, 4), int(lab)): b.tolist() for s, lab, b in zip(dets["scores"].tolist(), dets["labels"], dets["boxes"], strict=True)}
    s = lambda x: torch.sigmoid(torch.tensor(x)).item()  # noqa: E731
    # score = sqrt(sigmoid(cls) * sigmoid(ctr)).
    assert (round(math.sqrt(s(4.0) * s(5.0)), 4), 2) in rows
    assert rows[(round(math.sqrt(s(3.0) * s(5.0)), 4), 1)] == [10.0, 10.0, 30.0, 30.0]
    # (20,28) class 1 and (28,20) class 1 overlap (20,20) class 1 with IoU 240/560 = 0.43 < 0.6: kept.
    assert (round(math.sqrt(s(2.0) * s(5.0)), 4), 1) in rows
    # corner point (4,4) predicts (-6,-6,14,14): clipped to (0,0,14,14).
    assert rows[(round(math.sqrt(s(-2.5) * s(5.0)), 4), 0)] == [0.0, 0.0, 14.0, 14.0]
    assert dets["scores"].shape[0] == len(rows) == 5
    assert (dets["scores"][:-1] >= dets["scores"][1:]).all()


def test_postprocess_suppresses_duplicates_and_caps():
    fcos = FCOS(num_classes=3, max_detections=1)
    outs = _single_detection_outputs()
    outs[0][0][0, 1, 2, 3] = -10.0
    dets = fcos.postprocess(outs, [(128, 128)])[0]
    assert dets["boxes"].shape == (1, 4) and dets["labels"].tolist() == [2]
    fcos = FCOS(num_classes=3, nms_thresh=0.4)
    dets = fcos.postprocess(outs, [(128, 128)])[0]
    # (20,28) class 1 (IoU 0.43 with the stronger (20,20) class 1) is now suppressed; class 2 at the
    # same point is not (NMS is per class).
    assert sorted(dets["labels"].tolist()) == [0, 1, 2]


def test_flatten_outputs_order_matches_points():
    fcos = FCOS(num_classes=2)
    outs = [(torch.zeros(1, 2, h, w), torch.zeros(1, 4, h, w), torch.zeros(1, 1, h, w)) for h, w in SHAPES_128]
    outs[1][0][0, 1, 3, 5] = 7.0  # P4 row 3 col 5 -> point (5*16+8, 3*16+8) = (88, 56)
    cls, _, _ = flatten_outputs(outs)
    pts = fcos.points(SHAPES_128)
    (p, k) = torch.nonzero(cls[0] == 7.0)[0].tolist()
    assert k == 1 and pts.xy[p].tolist() == [88.0, 56.0]


def test_assigned_can_be_reused():
    shapes, targets, cls, reg, ctr = _random_problem(5)
    fcos = FCOS(num_classes=5)
    outs = []
    start = 0
    for h, w in shapes:
        n = h * w
        outs.append(
            (
                cls[:, start : start + n].reshape(2, h, w, 5).permute(0, 3, 1, 2),
                reg[:, start : start + n].reshape(2, h, w, 4).permute(0, 3, 1, 2),
                ctr[:, start : start + n].reshape(2, 1, h, w),
            )
        )
        start += n
    direct = fcos.loss(outs, targets)
    cached = fcos.loss(outs, fcos.assign(fcos.points(shapes), targets))
    assert isinstance(fcos.assign(fcos.points(shapes), targets), Assigned)
    for k in direct:
        assert direct[k].item() == pytest.approx(cached[k].item())


# ---------------------------------------------------------------- post-processing constants
# A 320x320 input: P3..P7 maps of 40, 20, 10, 5, 3 cells (P3 alone has 1600 points).
SHAPES_320 = [(40, 40), (20, 20), (10, 10), (5, 5), (3, 3)]
# float32 logit(0.05): torch.sigmoid maps it to exactly float32(0.05), the threshold itself.
LOGIT_AT_THRESH = torch.tensor(math.log(0.05 / 0.95), dtype=torch.float32)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _blank_outputs(shapes, K=1):
    """Level outputs where nothing fires (prob sigmoid(-10) = 4.5e-5) and every point
    predicts ltrb = exp(0) = 1 px, i.e. a 2x2 box around itself (cells are 8+ px apart,
    so no two of these boxes overlap)."""
    return [(torch.full((1, K, h, w), -10.0), torch.zeros(1, 4, h, w), torch.zeros(1, 1, h, w)) for h, w in shapes]


def _box_centres(dets):
    b = dets["boxes"]
    return torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)


def test_postprocess_default_constants():
    # FCOS's inference settings (maskrcnn-benchmark INFERENCE_TH 0.05, PRE_NMS_TOP_N 1000,
    # NMS_TH 0.6, DETECTIONS_PER_IMG 100); the detector builds FCOS with these defaults.
    fcos = FCOS(num_classes=80)
    assert (fcos.score_thresh, fcos.pre_nms_top_n, fcos.nms_thresh, fcos.max_detections) == (0.05, 1000, 0.6, 100)


def _crowded_p3_outputs():
    """1500 P3 candidates (K = 1) whose cls order is the reverse of their cls*ctr order,
    plus two P4 probes at the score threshold.

    P3 point i (row-major, i < 1500): p_i = 0.1 + 0.8 i / 1499 rises with i while
    s_i = p_i * ctr_i = 0.09 (1 - i / 1500) falls, so the top 1000 by cls*ctr are
    i = 0..999 and the top 1000 by cls alone are i = 500..1499. P3 points 1500..1599
    stay below the threshold.
    P4 (16, 8) [row 0, col 0]: prob = float32(0.05) exactly -> dropped (needs prob > 0.05).
    P4 (40, 8) [row 0, col 2]: the next float32 logit up, prob just above 0.05 -> kept,
    ctr 0.5, so s = 0.025 < s_999 = 0.030: a global (not per-level) top 1000 would drop it.
    """
    outs = _blank_outputs(SHAPES_320)
    cls3, _, ctr3 = outs[0]
    for i in range(1500):
        p = 0.1 + 0.8 * i / 1499
        s = 0.09 * (1 - i / 1500)
        row, col = divmod(i, 40)
        cls3[0, 0, row, col] = _logit(p)
        ctr3[0, 0, row, col] = _logit(s / p)
    cls4 = outs[1][0]
    cls4[0, 0, 0, 0] = LOGIT_AT_THRESH
    cls4[0, 0, 0, 2] = torch.nextafter(LOGIT_AT_THRESH, torch.tensor(0.0))
    return outs


def test_postprocess_keeps_the_top_1000_per_level_by_cls_times_ctr():
    outs = _crowded_p3_outputs()
    cls, _, _ = flatten_outputs(outs)
    prob = torch.sigmoid(cls.float())  # as postprocess computes it
    assert prob[0, 1600, 0].item() == torch.tensor(0.05).item()  # P4 probe: exactly at the threshold
    assert prob[0, 1602, 0].item() > torch.tensor(0.05).item()
    assert (prob[0, :1500, 0] > 0.05).all() and (prob[0, 1500:1600, 0] < 0.05).all()

    # max_detections raised (and no box overlaps another) so every candidate that
    # passed the per-level top-1000 shows up: 1000 from P3 + the P4 probe above 0.05.
    dets = FCOS(num_classes=1, max_detections=10_000).postprocess(outs, [(320, 320)])[0]
    centres = _box_centres(dets)
    on_p3 = (centres % 8 == 4).all(1)  # P3 centres are 8c + 4, P4 ones 16c + 8
    p3_index = ((centres[on_p3, 1] - 4) / 8 * 40 + (centres[on_p3, 0] - 4) / 8).round().long()
    assert sorted(p3_index.tolist()) == list(range(1000))  # by cls*ctr; by cls alone it would be 500..1499
    assert centres[~on_p3].tolist() == [[40.0, 8.0]]  # the P4 probe at exactly 0.05 (16, 8) is gone

    # With the defaults: the 100 best scores, sqrt(s_i) for i = 0..99, highest first.
    dets = FCOS(num_classes=1).postprocess(outs, [(320, 320)])[0]
    assert dets["scores"].shape == (100,)
    centres = _box_centres(dets)
    assert ((centres[:, 1] - 4) / 8 * 40 + (centres[:, 0] - 4) / 8).round().long().tolist() == list(range(100))
    expected = torch.tensor([math.sqrt(0.09 * (1 - i / 1500)) for i in range(100)])
    assert torch.allclose(dets["scores"], expected, rtol=1e-4)


def _box_at(outs, level, row, col, label, box, cls_logit):
    """Make P(3+level) cell (row, col) predict ``box`` (x1y1x2y2) for class ``label``."""
    stride = 8 * 2**level
    x, y = col * stride + stride // 2, row * stride + stride // 2
    cls, reg, _ = outs[level]
    cls[0, label, row, col] = cls_logit
    ltrb = torch.tensor([x - box[0], y - box[1], box[2] - x, box[3] - y], dtype=torch.float32)
    assert (ltrb > 0).all(), "the point must lie inside its box"
    reg[0, :, row, col] = ltrb.log()  # paper variant: distance = exp(scale 1 * reg)


def test_postprocess_classwise_nms_at_0_6():
    outs = _blank_outputs(SHAPES_320, K=2)
    # Equal heights, horizontal shift d, width w: IoU = (w - d) / (w + d).
    # w 159, d 41: 118 / 200 = 0.59 -> both kept.
    _box_at(outs, 0, 4, 12, 0, (20, 20, 179, 60), 3.0)  # point (100, 36)
    _box_at(outs, 0, 4, 17, 0, (61, 20, 220, 60), 2.0)  # point (140, 36)
    # w 161, d 39: 122 / 200 = 0.61 -> the weaker one suppressed.
    _box_at(outs, 0, 27, 12, 0, (20, 200, 181, 240), 3.0)  # point (100, 220)
    _box_at(outs, 0, 27, 17, 0, (59, 200, 220, 240), 2.0)  # point (140, 220)
    # The first box of that pair again (IoU 1) but class 1, weaker: kept, NMS is per class.
    _box_at(outs, 0, 27, 13, 1, (20, 200, 181, 240), 1.0)  # point (108, 220)
    dets = FCOS(num_classes=2).postprocess(outs, [(320, 320)])[0]
    got = sorted((int(lab), tuple(round(v, 3) for v in b.tolist())) for lab, b in zip(dets["labels"], dets["boxes"], strict=True))
    assert got == [
        (0, (20.0, 20.0, 179.0, 60.0)),
        (0, (20.0, 200.0, 181.0, 240.0)),
        (0, (61.0, 20.0, 220.0, 60.0)),
        (1, (20.0, 200.0, 181.0, 240.0)),
    ]
