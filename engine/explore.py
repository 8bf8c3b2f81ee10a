"""What the Patch Explorer shows, as plain functions: decode at any ξ, filter, one image's story.

The backbone runs once per image (:func:`engine.evaluate.collect` or :func:`single_image_cache`);
moving ξ only re-decodes the cached per-patch logits and norms, which takes milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import metrics as M
from engine.data.base import ImageSet, model_input
from engine.evaluate import Collected, outputs_at
from engine.models import PatchGrid, PatchModel, PatchOutput

OUTCOMES = ("all", "correct", "incorrect")


def is_correct(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Single-label: top class == label. Multi-label: the top class is one of the labels."""
    top = logits.argmax(1)
    if multilabel:
        return targets.gather(1, top[:, None]).squeeze(1) > 0
    return top == targets


def has_class(targets: torch.Tensor, multilabel: bool, k: int) -> torch.Tensor:
    return targets[:, k] > 0 if multilabel else targets == k


def filter_indices(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool, *,
                   outcome: str = "all", true_class: int | None = None,
                   predicted_class: int | None = None) -> torch.Tensor:
    """Indices of the images that pass every filter given."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {list(OUTCOMES)}; got {outcome!r}")
    keep = torch.ones(logits.shape[0], dtype=torch.bool)
    if outcome != "all":
        correct = is_correct(logits, targets, multilabel)
        keep &= correct if outcome == "correct" else ~correct
    if true_class is not None:
        keep &= has_class(targets, multilabel, true_class)
    if predicted_class is not None:
        keep &= logits.argmax(1) == predicted_class
    return keep.nonzero().flatten()


@torch.no_grad()
def single_image_cache(model: PatchModel, image: torch.Tensor, data: ImageSet) -> Collected:
    """Cache for one uint8 (3, H, W) image, normalised like ``data``."""
    model.eval()
    device = next(model.parameters()).device
    x = model_input(data, image[None], device)
    cache = {k: v.float().cpu() for k, v in model.xi_cache(x).items()}
    return Collected(cache, model.grid(tuple(image.shape[-2:])), 0.0)


def decode(model: PatchModel, collected: Collected, xi: float | None) -> PatchOutput:
    if xi is not None and not 0.0 <= xi <= 1.0:
        raise ValueError(f"xi must lie in [0, 1]; got {xi}")
    return outputs_at(model, collected, xi)


@dataclass
class ImageStory:
    """One image at one ξ: the prediction and every patch's part in it."""

    index: int
    probabilities: torch.Tensor   # (K,) softmax, or sigmoid for multi-label models
    predicted: int
    weights: torch.Tensor         # (M,)
    class_logits: torch.Tensor    # (M,) each patch's logit for the chosen class
    patch_predictions: torch.Tensor  # (M,) each patch's own top class
    selected: torch.Tensor        # (M,) bool
    selection_box: tuple[int, int, int, int] | None
    grid: PatchGrid

    def top_patches(self, k: int) -> torch.Tensor:
        return self.weights.argsort(descending=True)[:k]


def image_story(model: PatchModel, out: PatchOutput, index: int, klass: int,
                multilabel: bool) -> ImageStory:
    if out.patch_weights is None:
        raise ValueError(f"head {model.config.head!r} has no patches to explore")
    logits = out.logits[index]
    probabilities = torch.sigmoid(logits) if multilabel else torch.softmax(logits, 0)
    weights = out.patch_weights[index]
    selected = M.selection_mask(weights[None], model.selection)[0]
    box, found = M.selection_boxes(selected[None], out.grid.boxes)
    return ImageStory(
        index=index, probabilities=probabilities, predicted=int(logits.argmax()),
        weights=weights, class_logits=out.patch_logits[index, :, klass],
        patch_predictions=out.patch_logits[index].argmax(-1), selected=selected,
        selection_box=tuple(int(v) for v in box[0].tolist()) if bool(found[0]) else None,
        grid=out.grid)


def patch_rows(story: ImageStory, classes: list[str], klass: int) -> list[dict]:
    """One row per patch for the weights CSV."""
    boxes = story.grid.boxes.tolist()
    return [{"patch": m, "row": m // story.grid.cols, "col": m % story.grid.cols,
             "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3],
             "weight": float(story.weights[m]), "selected": bool(story.selected[m]),
             f"logit_{classes[klass]}": float(story.class_logits[m]),
             "patch_prediction": classes[int(story.patch_predictions[m])]}
            for m, b in enumerate(boxes)]


def true_boxes(data: ImageSet, index: int) -> list[tuple[int, tuple[float, ...]]]:
    """(class, (x0, y0, x1, y1)) of every ground-truth box of image ``index``."""
    if not data.has_boxes:
        return []
    return [(int(r[0]), tuple(r[1:].tolist())) for r in data.boxes(index)]
