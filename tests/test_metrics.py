"""Known-answer tests of every evaluation metric, on hand-built tensors."""

import math

import numpy as np
import pytest
import torch

from engine import metrics as M
from engine.explain import (
    average_drop_increase,
    coverage,
    deletion_insertion,
    energy_pointing,
    patch_map,
    pointing_game,
)
from engine.models.geometry import PatchGrid

NAN = float("nan")


def grid_2x2():
    """Four 10x10 patches tiling a 20x20 image, row-major."""
    boxes = torch.tensor([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]])
    return PatchGrid(2, 2, (20, 20), (20, 20), boxes)


def test_classification_metrics():
    logits = torch.tensor([[3.0, 1, 0, 0, 0, 0, 0], [0, 3, 2, 1, 0, 0, 0],
                           [-3, -2, -1, 1, 2, 3, 4]])
    out = M.classification_metrics(logits, torch.tensor([0, 2, 0]))
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["top5"] == pytest.approx(2 / 3)  # class 0 is 7th for image 2
    assert out["confusion"][0] == [1, 0, 0, 0, 0, 0, 1] and out["confusion"][2][1] == 1
    assert out["per_class_accuracy"][0] == 0.5 and out["per_class_accuracy"][2] == 0.0
    assert math.isnan(out["per_class_accuracy"][1])  # no image of class 1


@pytest.mark.parametrize("labels, expected", [
    ([1, 1, 0, 1, 0, 0, 1, 0, 0, 0], 1.0),       # boundary only at recall 1; p[0] fills the rest
    ([0, 1, 1, 1, 1, 1, 1, 1, 1, 1], (8 / 9) / 11),  # top item negative: p[0] = 0 for 10 buckets
    ([1] * 10, 1.0),
    ([0] * 10, 0.0),                              # no positives: 0, as the released code
])
def test_paper_11point_ap_known_answers(labels, expected):
    scores = np.arange(10, 0, -1, dtype=float)
    assert M.paper_11point_ap(scores, np.array(labels)) == pytest.approx(expected, abs=1e-6)


def _released_ap(scores, labels):
    """The released utils/calculate_AP.py algorithm, run through torch tensors as its source does
    (float32 tensors, Python-float counters): the reference the port must equal."""
    weights, truth = torch.tensor(scores, dtype=torch.float32), torch.tensor(labels)
    _, index = weights.sort(descending=True, stable=True)
    n, ten = len(scores), (truth > 0).sum().float()
    p, r = torch.zeros(n), torch.zeros(n)
    bounds, p_max = torch.zeros(12).long(), torch.zeros(11)
    count, bucket = 0.0, 0
    for i in range(n):
        if truth[index[i]] > 0:
            count += 1
            p[i] = count / (i + 1)
            r[i] = count / ten
            if (r[i] > 0.1 * bucket) and (r[i] < 0.1 * (bucket + 1)) or r[i] == 1.0:
                bucket += 1
                bounds[bucket] = i
    for i in range(11):
        p_max[i] = p[bounds[i + 1]] if bounds[i + 1] == 0 else max(p[bounds[i]:bounds[i + 1]])
    return float(p_max.mean())


def test_paper_11point_ap_equals_the_released_arithmetic():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(20, 300))
        labels = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(int)
        scores = rng.permutation(n).astype(float)
        assert M.paper_11point_ap(scores, labels) == pytest.approx(_released_ap(scores, labels),
                                                                   abs=1e-6)
    # 41 positives: in float32, 41 * (1/41) < 1, so the last bucket is never set and falls back to
    # the precision at rank 0 (0 here, a negative on top), unlike exact division.
    labels = np.array([0] + [1] * 41 + [0] * 8)
    scores = np.arange(50, 0, -1, dtype=float)
    assert M.paper_11point_ap(scores, labels) == pytest.approx(_released_ap(scores, labels))
    assert np.float32(41) * (np.float32(1) / np.float32(41)) != 1.0
    # With 40 positives, 40 * fl(1/40) == 1: the same ranking sets its last bucket, scoring higher.
    assert np.float32(40) * (np.float32(1) / np.float32(40)) == 1.0
    forty = M.paper_11point_ap(scores, np.array([0] + [1] * 40 + [0] * 9))
    assert forty > M.paper_11point_ap(scores, labels) + 0.05


def test_paper_11point_ap_with_ties_ranks_tied_items_in_input_order():
    """Items 1-3 tie at 0.5. Stable order keeps them as given: hits 0,1,0,1,1 (3 positives).
    Precision at the positive ranks 1, 3, 4: 1/2, 2/4, 3/5; the recall only enters a bucket
    strictly at rank 4 (recall 1), so bounds = [0, 4, 0, ...]: value 0 = max p[0:4] = 1/2,
    values 1-10 = p[0] = 0 (a negative on top). AP = (1/2)/11."""
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    given = np.array([0, 1, 0, 1, 1])
    assert M.paper_11point_ap(scores, given) == pytest.approx(0.5 / 11, abs=1e-7)
    # The same data with the tied items 2 and 3 swapped: hits 0,1,1,0,1, so p[0:4] peaks at
    # 2/3. An unstable sort (the released code's) may rank the tie either way: ties matter.
    swapped = np.array([0, 1, 1, 0, 1])
    assert M.paper_11point_ap(scores, swapped) == pytest.approx((2 / 3) / 11, abs=1e-7)
    # A tie at the top decides p[0], which fills most buckets: 0 against 1.
    top = np.array([0.9, 0.9, 0.1])
    assert M.paper_11point_ap(top, np.array([0, 1, 0])) == 0.0
    assert M.paper_11point_ap(top, np.array([1, 0, 0])) == 1.0
    # The standard AP scores a tied group as one threshold: the order within it is irrelevant.
    standard = M.average_precision_per_class(np.stack([scores, scores], 1),
                                             np.stack([given, swapped], 1))
    assert standard[0] == pytest.approx(standard[1])


def test_selection_mask_rules():
    weights = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert M.selection_mask(weights, "positive").tolist() == [[True, True, True, False],
                                                              [True, True, True, True]]
    assert M.selection_mask(weights, "above_uniform").tolist() == [[True, True, False, False],
                                                                   [False, False, False, False]]
    assert M.selection_mask(weights, "all").all()
    with pytest.raises(ValueError, match="selection"):
        M.selection_mask(weights, "top")


def test_multilabel_metrics():
    scores = np.array([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.1, 0.9, 0.3], [0.2, 0.2, 0.4]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0]])
    out = M.multilabel_metrics(scores, targets)
    # class 0: ranks +,-,+,- ... scores 0.9(+),0.8(-),0.2(+),0.1(-): AP = (1 + 2/3)/2
    assert out["per_class_ap"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert out["per_class_ap"][1] == pytest.approx(1.0)
    assert math.isnan(out["per_class_ap"][2]) and out["classes_with_positives"] == 2
    assert out["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert out["per_class_ap_11point_paper"][2] == 0.0  # empty column counts 0 in the paper mAP


def test_box_patch_overlap_more_than_half():
    boxes = torch.tensor([[0.0, 0, 10, 10],    # patch 0 entirely
                          [0.0, 0, 14, 10],    # patch 1 by 40 %: no
                          [0.0, 0, 15, 10],    # patch 1 by exactly 50 %: no (strictly more)
                          [0.0, 0, 16, 10]])   # patch 1 by 60 %: yes
    out = M.box_patch_overlap(grid_2x2().boxes, boxes)
    assert out.tolist() == [[True, False, False, False], [True, False, False, False],
                            [True, False, False, False], [True, True, False, False]]


def test_patch_ground_truth_uses_boxes_of_image_classes():
    box_data = torch.tensor([[0.0, 0, 0, 10, 10],     # image 0, class 0 (its label)
                             [1.0, 10, 10, 20, 20],   # image 0, class 1 (not its label)
                             [1.0, 0, 10, 20, 20]])   # image 1, class 1
    offsets = torch.tensor([0, 2, 3])
    grid = grid_2x2().boxes
    single = M.patch_ground_truth(grid, box_data, offsets, torch.tensor([0, 1]), False)
    assert single.tolist() == [[True, False, False, False], [False, False, True, True]]
    multi_targets = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    multi = M.patch_ground_truth(grid, box_data, offsets, multi_targets, True)
    assert multi[0].tolist() == [True, False, False, True]
    only1 = M.patch_ground_truth(grid, box_data, offsets, multi_targets, True, class_index=1)
    assert only1[0].tolist() == [False, False, False, True]


def test_label_agreement():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    assert M.label_agreement(logits, torch.tensor([1]), False).tolist() == [[False, True]]
    multi = torch.tensor([[[1.0, -1.0], [-1.0, -1.0]]])
    assert M.label_agreement(multi, torch.tensor([[1.0, 0.0]]), True).tolist() == [[True, False]]


def test_patch_prf_both_definitions():
    sel = torch.tensor([[True, True, True, False], [True, False, False, False]])
    agr = torch.tensor([[True, False, True, True], [True, True, True, True]])
    gt = torch.tensor([[True, True, False, True], [False, False, False, False]])
    out = M.patch_prf(sel, agr, gt)
    # paper: TP = sel&agr&gt = 1 (image 0, patch 0); sel&agr = 3; positives = 3
    assert out["precision_paper"] == pytest.approx(1 / 3)
    assert out["recall_paper"] == pytest.approx(1 / 3)
    assert out["f_paper"] == pytest.approx(1 / 3)
    # location only: sel&gt = 2 of 4 selected; recall 2 of 3
    assert out["precision"] == pytest.approx(0.5) and out["recall"] == pytest.approx(2 / 3)
    assert out["f"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert out["selected_per_image"] == 2.0
    none = M.patch_prf(torch.zeros(1, 4, dtype=torch.bool), agr[:1], gt[:1])
    assert math.isnan(none["precision"]) and none["recall"] == 0.0 and math.isnan(none["f"])


def test_pr_curve_ap():
    scores = torch.tensor([[0.9, 0.8, 0.3, 0.1]])
    assert M.pr_curve(scores, torch.tensor([[True, True, False, False]]))["ap"] == 1.0
    assert M.pr_curve(scores, torch.tensor([[False, True, False, True]]))["ap"] == \
        pytest.approx((1 / 2 + 2 / 4) / 2)
    assert math.isnan(M.pr_curve(scores, torch.zeros(1, 4, dtype=torch.bool))["ap"])


def test_image_pr_curves_per_class_and_micro():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.7, 0.6, 0.0]])
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0]])
    curves = M.image_pr_curves(scores, targets, ["a", "b", "c"])
    assert [c["class"] for c in curves["per_class"]] == ["a", "b"]   # "c" has no positives
    assert curves["per_class"][0]["ap"] == 1.0                       # a: 0.9 ranks first
    assert curves["per_class"][1]["ap"] == 1.0                       # b: 0.8, 0.6 over 0.1
    # micro: ranking 0.9+ 0.8+ 0.7- 0.6+ ... -> AP = (1 + 1 + 3/4) / 3
    assert curves["overall"]["ap"] == pytest.approx((1 + 1 + 0.75) / 3)


def test_localization_known_answer():
    grid = grid_2x2().boxes
    selected = torch.tensor([[True, True, False, False],    # box (0,0,20,10)
                             [False, False, False, True],   # box (10,10,20,20)
                             [False, False, False, False]])  # nothing selected
    box, found = M.selection_boxes(selected, grid)
    assert box[0].tolist() == [0, 0, 20, 10] and found.tolist() == [True, True, False]
    box_data = torch.tensor([[0.0, 0, 0, 20, 12],   # image 0: IoU 200/240 > 0.5
                             [1.0, 0, 0, 20, 20],   # image 1: IoU 100/400
                             [1.0, 10, 10, 20, 20],  # image 1 (class 1 again): IoU 1
                             [0.0, 0, 0, 20, 20]])  # image 2
    offsets = torch.tensor([0, 1, 3, 4])
    out = M.localization_metrics(selected, grid, predicted=torch.tensor([0, 0, 0]),
                                 targets=torch.tensor([0, 1, 0]), box_data=box_data,
                                 box_offsets=offsets)
    assert out["gt_known_loc"] == pytest.approx(2 / 3)   # images 0 and 1
    assert out["top1_loc"] == pytest.approx(1 / 3)       # image 1's class is wrong
    assert out["mean_iou"] == pytest.approx((200 / 240 + 1 + 0) / 3)
    assert out["no_selection"] == 1


def test_patch_map_averages_overlaps():
    boxes = torch.tensor([[0, 0, 6, 4], [4, 0, 10, 4]])  # overlap in columns 4-5
    grid = PatchGrid(1, 2, (5, 10), (5, 10), boxes)
    painted = patch_map(torch.tensor([[1.0, 0.0]]), grid)[0]
    assert painted[0, :4].tolist() == [1, 1, 1, 1]
    assert painted[0, 4:6].tolist() == [0.5, 0.5] and painted[0, 6:].sum() == 0
    assert painted[4].sum() == 0  # row 4 lies in no box
    assert coverage(grid).sum() == 2 * 24


def test_pointing_and_energy():
    maps = torch.zeros(2, 20, 20)
    maps[0, 2, 2] = 1.0        # inside the box
    maps[1, 15, 15] = 1.0      # centre (15.5, 15.5): 14.85 px from the box corner (5, 5)
    boxes = [torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([[0.0, 0, 5, 5]])]
    assert pointing_game(maps, boxes).tolist() == [1.0, 1.0]
    assert pointing_game(maps, boxes, tolerance=10).tolist() == [1.0, 0.0]
    assert math.isnan(pointing_game(maps[:1], [torch.zeros(0, 4)])[0])
    flat = torch.ones(1, 20, 20)
    assert energy_pointing(flat, [torch.tensor([[0.0, 0, 10, 10]])]).item() == pytest.approx(0.25)


def brightness(pixels, classes):
    """A stand-in scorer: the image's mean brightness."""
    return pixels.mean((1, 2, 3))


def test_average_drop_and_increase():
    pixels = torch.ones(2, 3, 4, 4)
    maps = torch.stack([torch.full((4, 4), 0.5), torch.ones(4, 4)])
    drop, increase = average_drop_increase(brightness, pixels, maps, torch.zeros(2).long())
    assert drop.tolist() == [0.5, 0.0] and increase.tolist() == [0.0, 0.0]
    darker = torch.full((1, 3, 4, 4), 0.5)
    _, up = average_drop_increase(brightness, darker, torch.ones(1, 4, 4), torch.zeros(1).long(),
                                  base=torch.tensor([0.25]))
    assert up.tolist() == [1.0]


def test_deletion_and_insertion_auc():
    pixels = torch.ones(1, 3, 8, 8)
    maps = torch.rand(1, 8, 8)
    deletion, insertion = deletion_insertion(brightness, pixels, maps, torch.zeros(1).long(),
                                             steps=8)
    assert deletion.item() == pytest.approx(0.5)   # brightness falls linearly 1 -> 0
    assert insertion.item() == pytest.approx(1.0)  # a blurred all-ones image is all ones


def test_deletion_and_insertion_follow_the_map_ranking():
    """Left half bright, right half black. A map that ranks the bright half first removes the
    evidence at once (low deletion AUC) and restores it at once (high insertion AUC)."""
    pixels = torch.zeros(1, 3, 8, 8)
    pixels[..., :4] = 1.0
    good = torch.zeros(1, 8, 8)
    good[..., :4] = 1.0
    classes = torch.zeros(1).long()
    d_good, i_good = deletion_insertion(brightness, pixels, good, classes, steps=2)
    d_bad, i_bad = deletion_insertion(brightness, pixels, 1 - good, classes, steps=2)
    # Scores 0.5, 0, 0 -> trapezoid mean (0.25 + 0 + 0) / 2; reversed: 0.5, 0.5, 0 -> 0.375.
    assert d_good.item() == pytest.approx(0.125) and d_bad.item() == pytest.approx(0.375)
    assert i_good.item() > 0.5 > i_bad.item()
