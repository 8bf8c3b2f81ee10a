"""Image-level metrics and the per-epoch evaluation of a model on a data set.

Multi-label mAP is the standard (sklearn, area under the PR curve) AP averaged over the classes
that have at least one positive; a class without positives has no defined AP and is left out.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.data.base import BatchStream, ImageSet
from engine.device import autocast


def selection_mask(weights: torch.Tensor, selection: str) -> torch.Tensor:
    """Selected patches: weight > 0 (Loss-Attention) or > 1/M (baselines, METHOD.md)."""
    if selection == "positive":
        return weights > 0
    if selection == "above_uniform":
        return weights > 1.0 / weights.shape[1]
    raise ValueError(f"selection must be 'positive' or 'above_uniform'; got {selection!r}")


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


def main_metric(multilabel: bool) -> str:
    return "test_map" if multilabel else "test_acc"
