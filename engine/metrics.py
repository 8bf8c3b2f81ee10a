"""Metrics: image level, patch level, localization, and the per-epoch evaluation.

Definitions (METHOD.md §6 and "Project decisions"):

- **mAP** (multi-label): the standard AP (sklearn; area under the PR curve) averaged over the
  classes that have a positive. For comparison with the paper, ``paper_11point_ap`` re-implements
  the released ``calculate_AP`` with its quirks, averaged over *all* columns as the paper does.
- **Ground-truth patches**: a patch is positive when more than half of its pixel box lies inside a
  box of one of the image's classes.
- **Selected patches**: weight > 0 for Loss-Attention, weight > 1/M for the baselines.
- **Label agreement**: single-label, the patch's arg-max class is the image label. Multi-label,
  σ(patch logit) > 0.5 for some image label.
- **Patch precision / recall / F**, two definitions, named so the UI can say which:
  ``*_paper`` as the released code: TP = selected ∧ agreeing ∧ positive, precision = TP /
  (selected ∧ agreeing), recall = TP / positive. The plain ones are location only: precision =
  (selected ∧ positive) / selected, recall = (selected ∧ positive) / positive. All micro-averaged
  over the data set. A ratio with an empty denominator is NaN (reported as null).
- **Localization**: the predicted box is the tight rectangle around the selected patches' pixel
  boxes; it is correct when IoU > 0.5 with a ground-truth box of the image's true class
  (GT-known), and for top-1 localization the predicted class must be right too.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.data.base import BatchStream, ImageSet
from engine.device import autocast


def selection_mask(weights: torch.Tensor, selection: str) -> torch.Tensor:
    """Selected patches: weight > 0 (Loss-Attention), > 1/M (the attention baselines, METHOD.md)
    or every patch (Mean-pooling, whose uniform weights use every patch alike)."""
    if selection == "positive":
        return weights > 0
    if selection == "above_uniform":
        return weights > 1.0 / weights.shape[1]
    if selection == "all":
        return torch.ones_like(weights, dtype=torch.bool)
    raise ValueError(f"selection must be 'positive', 'above_uniform' or 'all'; got {selection!r}")


def average_precision_per_class(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """AP per class (NaN where a class has no positive)."""
    from sklearn.metrics import average_precision_score

    ap = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        if targets[:, k].any():
            ap[k] = average_precision_score(targets[:, k], scores[:, k])
    return ap


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    ap = average_precision_per_class(scores, targets)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


@torch.no_grad()
def evaluate(model, data: ImageSet, device: torch.device, *, batch_size: int = 256,
             amp: bool = False, images: torch.Tensor | None = None) -> dict:
    """Test loss (image term), accuracy / top-5 or mAP, and patch selection statistics."""
    was_training = model.training
    model.eval()
    n, loss_sum, correct, top5 = 0, 0.0, 0, 0
    selected, max_weight, has_patches = 0.0, 0.0, False
    logits_all, targets_all = [], []
    stream = BatchStream(data, batch_size, device, images=images)
    try:
        for x, y, _ in stream:
            with autocast(device, amp):
                out = model(x)
            logits = out.logits.float()
            if data.multilabel:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, y.float(), reduction="sum")
                logits_all.append(logits.cpu())
                targets_all.append(y.cpu())
            else:
                loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                correct += (logits.argmax(1) == y).sum().item()
                k = min(5, logits.shape[1])
                top5 += (logits.topk(k, 1).indices == y[:, None]).any(1).sum().item()
            loss_sum += loss.item()
            if out.patch_weights is not None:
                has_patches = True
                w = out.patch_weights.float()
                selected += selection_mask(w, model.selection).sum().item()
                max_weight += w.max(1).values.sum().item()
            n += x.shape[0]
    finally:
        model.train(was_training)
    result = {"test_loss": loss_sum / n}
    if data.multilabel:
        result["test_map"] = mean_average_precision(torch.cat(logits_all).numpy(),
                                                    torch.cat(targets_all).numpy())
    else:
        result["test_acc"] = correct / n
        result["test_top5"] = top5 / n
    if has_patches:  # 0 is a real answer: uniform baseline weights never exceed 1/M
        result["patches_selected"] = selected / n
        result["max_weight"] = max_weight / n
    return result


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def _f_score(p: float, r: float) -> float:
    if np.isnan(p) or np.isnan(r) or p + r == 0:
        return float("nan") if np.isnan(p) or np.isnan(r) else 0.0
    return 2 * p * r / (p + r)


# ----------------------------------------------------------------------------------------------
# Image level


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Accuracy, top-5, per-class accuracy (NaN for a class without images), confusion matrix
    (rows = true class, columns = predicted)."""
    k = logits.shape[1]
    pred = logits.argmax(1)
    confusion = torch.bincount(targets * k + pred, minlength=k * k).view(k, k)
    per_class = confusion.diag().double() / confusion.sum(1).double()
    topk = min(5, k)
    return {
        "accuracy": (pred == targets).double().mean().item(),
        "top5": (logits.topk(topk, 1).indices == targets[:, None]).any(1).double().mean().item(),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }


def paper_11point_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """The AP of the released ``utils/calculate_AP.py``, re-implemented with its quirks.

    Positives are ranked by score. At each positive rank the precision is recorded, and the rank
    is recorded as a bucket boundary when the recall lies *strictly* inside the next 10 % bucket
    (or reaches exactly 1). So exact multiples of 10 % and skipped buckets do not advance it. Each
    of the 11 values is the max precision over the ranks between consecutive boundaries (the
    later one excluded), or the precision at rank 0 when a boundary was never set. AP = their
    mean, and 0 for a class without positives.

    Ties: items with equal scores keep their input order (a stable sort). The released code
    sorted with torch's default sort, which is not stable, so where a tie mixes positives and
    negatives its ranking of the tied items, and with it the AP, depended on their order in
    memory (and on the device); this port gives one definite value, which the released code may
    not have. Ties are rare between float logits and common between rounded or saturated
    scores. The standard AP (:func:`average_precision_per_class`) ranks tied items as one group
    and does not depend on their order.
    """
    labels = np.asarray(labels) > 0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = labels[order]
    # The released code divides a Python float by a float32 tensor, which torch computes as
    # count * reciprocal(n_pos) in float32. For some positive counts (41, 47, 55, ...) that never
    # reaches exactly 1.0, so the last bucket is never set: reproduced, as the paper's numbers are.
    inverse = np.float32(1) / np.float32(hits.sum()) if hits.any() else np.float32(np.inf)
    precision = np.zeros(len(hits), dtype=np.float32)
    bounds = np.zeros(12, dtype=np.int64)
    bucket = 0
    for count, rank in enumerate(np.flatnonzero(hits), start=1):
        precision[rank] = np.float32(count / (rank + 1))  # double division, stored as float32
        recall = np.float32(count) * inverse
        inside = np.float32(0.1 * bucket) < recall < np.float32(0.1 * (bucket + 1))
        if inside or recall == np.float32(1.0):
            bucket += 1
            bounds[bucket] = rank
    values = [precision[bounds[i + 1]] if bounds[i + 1] == 0
              else precision[bounds[i]:bounds[i + 1]].max() for i in range(11)]
    return float(np.mean(values))


def multilabel_metrics(scores: np.ndarray, targets: np.ndarray) -> dict:
    ap = average_precision_per_class(scores, targets)
    ap11 = np.array([paper_11point_ap(scores[:, k], targets[:, k])
                     for k in range(scores.shape[1])])
    return {
        "map": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        "map_11point_paper": float(ap11.mean()),
        "per_class_ap": ap.tolist(),
        "per_class_ap_11point_paper": ap11.tolist(),
        "classes_with_positives": int(np.isfinite(ap).sum()),
    }


# ----------------------------------------------------------------------------------------------
# Patch level


def box_patch_overlap(grid_boxes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(T, M): True where more than half of patch m's pixel box lies inside box t.

    ``grid_boxes`` (M, 4) and ``boxes`` (T, 4) are (x0, y0, x1, y1) half-open pixel boxes."""
    g = grid_boxes.double()[None]  # (1, M, 4)
    b = boxes.double()[:, None]    # (T, 1, 4)
    w = (torch.minimum(g[..., 2], b[..., 2]) - torch.maximum(g[..., 0], b[..., 0])).clamp_min(0)
    h = (torch.minimum(g[..., 3], b[..., 3]) - torch.maximum(g[..., 1], b[..., 1])).clamp_min(0)
    area = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])
    return w * h > 0.5 * area


def _box_images(box_offsets: torch.Tensor) -> torch.Tensor:
    counts = box_offsets.diff()
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def patch_ground_truth(grid_boxes: torch.Tensor, box_data: torch.Tensor,
                       box_offsets: torch.Tensor, targets: torch.Tensor, multilabel: bool,
                       class_index: int | None = None) -> torch.Tensor:
    """(N, M) ground-truth patch labels from the boxes of each image's classes.

    With ``class_index`` only boxes of that class count (per-class curves)."""
    n, m = len(box_offsets) - 1, grid_boxes.shape[0]
    image = _box_images(box_offsets)
    cls = box_data[:, 0].long()
    if class_index is not None:
        relevant = cls == class_index
    elif multilabel:
        relevant = targets[image, cls] > 0
    else:
        relevant = cls == targets[image]
    inside = box_patch_overlap(grid_boxes, box_data[:, 1:5]) & relevant[:, None]
    gt = torch.zeros(n, m, dtype=torch.uint8)
    gt.scatter_reduce_(0, image[:, None].expand(-1, m), inside.to(torch.uint8), "amax")
    return gt.bool()


def label_agreement(patch_logits: torch.Tensor, targets: torch.Tensor,
                    multilabel: bool) -> torch.Tensor:
    """(N, M): the patch's own prediction agrees with an image label."""
    if multilabel:
        return ((torch.sigmoid(patch_logits) > 0.5) & (targets[:, None, :] > 0)).any(-1)
    return patch_logits.argmax(-1) == targets[:, None]


def patch_prf(selected: torch.Tensor, agree: torch.Tensor, gt: torch.Tensor) -> dict:
    """Micro-averaged patch precision / recall / F in both definitions (module docstring)."""
    sel, agr, pos = selected.sum().item(), (selected & agree).sum().item(), gt.sum().item()
    tp_paper = (selected & agree & gt).sum().item()
    tp = (selected & gt).sum().item()
    p_paper, r_paper = _ratio(tp_paper, agr), _ratio(tp_paper, pos)
    p, r = _ratio(tp, sel), _ratio(tp, pos)
    return {"precision_paper": p_paper, "recall_paper": r_paper, "f_paper": _f_score(p_paper,
                                                                                    r_paper),
            "precision": p, "recall": r, "f": _f_score(p, r),
            "selected_per_image": sel / max(selected.shape[0], 1),
            "agreeing_fraction": _ratio(agr, sel), "positive_patches": int(pos)}


def pr_curve(scores: torch.Tensor, labels: torch.Tensor, max_points: int = 101) -> dict:
    """Precision-recall curve over a score threshold, with AP (sklearn), thinned for display."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y, s = labels.flatten().numpy().astype(bool), scores.flatten().double().numpy()
    if not y.any():
        return {"ap": float("nan"), "precision": [], "recall": [], "threshold": [],
                "positives": 0, "count": len(y)}
    precision, recall, threshold = precision_recall_curve(y, s)
    keep = np.unique(np.linspace(0, len(threshold) - 1, min(max_points, len(threshold)))
                     .round().astype(int))
    return {"ap": float(average_precision_score(y, s)),
            "precision": precision[keep].tolist(), "recall": recall[keep].tolist(),
            "threshold": threshold[keep].tolist(), "positives": int(y.sum()),
            "count": len(y)}


def patch_pr_curves(scores: torch.Tensor, grid_boxes: torch.Tensor, box_data: torch.Tensor,
                    box_offsets: torch.Tensor, targets: torch.Tensor, multilabel: bool,
                    classes: list[str]) -> dict:
    """Patch-level PR curves over the weight threshold: overall, and per class over the images
    of that class (ground truth: that class's boxes)."""
    gt = patch_ground_truth(grid_boxes, box_data, box_offsets, targets, multilabel)
    per_class = []
    for k, name in enumerate(classes):
        images = targets[:, k] > 0 if multilabel else targets == k
        if not images.any():
            continue
        gt_k = patch_ground_truth(grid_boxes, box_data, box_offsets, targets, multilabel, k)
        per_class.append({"class": name, "index": k, "images": int(images.sum()),
                          **pr_curve(scores[images], gt_k[images])})
    return {"overall": pr_curve(scores, gt), "per_class": per_class}


def image_pr_curves(scores: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict:
    """Image-level PR curves of a multi-label model: per class (score: the class logit) and
    micro-averaged over all (image, class) pairs."""
    per_class = [{"class": name, "index": k, "images": int((targets[:, k] > 0).sum()),
                  **pr_curve(scores[:, k], targets[:, k] > 0)}
                 for k, name in enumerate(classes) if (targets[:, k] > 0).any()]
    return {"overall": pr_curve(scores, targets > 0), "per_class": per_class}


# ----------------------------------------------------------------------------------------------
# Localization


def selection_boxes(selected: torch.Tensor, grid_boxes: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight box (N, 4) around each image's selected patch boxes, and whether it exists."""
    boxes = grid_boxes.double()[None].expand(selected.shape[0], -1, -1)
    mask = selected[..., None]
    low = torch.where(mask, boxes, torch.full_like(boxes, float("inf"))).amin(1)
    high = torch.where(mask, boxes, torch.full_like(boxes, float("-inf"))).amax(1)
    found = selected.any(1)
    out = torch.cat([low[:, :2], high[:, 2:]], 1)
    return torch.where(found[:, None], out, torch.zeros_like(out)), found


def _area(box: torch.Tensor) -> torch.Tensor:
    return (box[:, 2] - box[:, 0]).clamp_min(0) * (box[:, 3] - box[:, 1]).clamp_min(0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of two (N, 4) box tensors."""
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp_min(0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp_min(0)
    inter = w * h
    union = _area(a) + _area(b) - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def localization_metrics(selected: torch.Tensor, grid_boxes: torch.Tensor,
                         predicted: torch.Tensor, targets: torch.Tensor, box_data: torch.Tensor,
                         box_offsets: torch.Tensor) -> dict:
    """GT-known and top-1 localization accuracy (IoU > 0.5 with a box of the true class)."""
    pred_box, found = selection_boxes(selected, grid_boxes)
    image = _box_images(box_offsets)
    own = box_data[:, 0].long() == targets[image]
    iou = box_iou(pred_box[image], box_data[:, 1:5].double())
    iou = torch.where(own & found[image], iou, torch.zeros_like(iou))
    best = torch.zeros(len(targets), dtype=torch.float64)
    best.scatter_reduce_(0, image, iou, "amax")
    correct = best > 0.5
    return {"gt_known_loc": correct.double().mean().item(),
            "top1_loc": (correct & (predicted == targets)).double().mean().item(),
            "mean_iou": best.mean().item(), "no_selection": int((~found).sum())}
