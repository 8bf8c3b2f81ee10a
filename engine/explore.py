"""What the Patch Explorer shows, as plain functions: decode at any ξ, filter, one image's story.

The backbone runs once per image (:func:`engine.evaluate.collect` or :func:`single_image_cache`);
moving ξ only re-decodes the cached per-patch logits and norms, which takes milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from engine import metrics as M
from engine.config import RunConfig, config_from_dict, config_to_dict
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


def story_picture(story: ImageStory, image, true_boxes=()):
    """The Explorer's picture of ``story`` over ``image`` (H, W, 3 uint8) as a PIL image: the
    fixed √α scale, removed patches greyed, patch numbers, the kept-patch box and the true
    boxes; what the app's PNG download and ``python -m engine explain`` write."""
    from engine.pictures import patch_overlay, weight_colour_value

    return patch_overlay(image, story.grid.boxes.numpy(), story.grid.rows, story.grid.cols,
                         weight_colour_value(story.weights.numpy()), true_boxes=true_boxes,
                         selection_box=story.selection_box, removed=~story.selected.numpy(),
                         numbers=True)


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


@dataclass
class ThresholdView:
    """What the threshold compares for one image: the sorted-scores chart's data.

    ``scores`` (M,) are â_m, the patches' shares of the logit norms (Loss-Attention heads), or the
    weights themselves (the attention baselines, which select weight > 1/M); a patch is kept when
    its score is above ``cut`` (θ = ξ/M or ξ/(H·W)); ``cut`` is None when every patch counts."""

    scores: torch.Tensor
    cut: float | None
    score_name: str
    cut_name: str


def threshold_view(model: PatchModel, collected: Collected, out: PatchOutput, index: int,
                   xi: float) -> ThresholdView:
    scores = model.head.selection_scores({k: v[index:index + 1]
                                          for k, v in collected.cache.items()})
    if scores is not None:
        denominator = ("M" if model.config.xi_denominator == "patches" else "H·W")
        return ThresholdView(scores[0], model.theta(out.grid, xi), "â_m (share of logit norms)",
                             f"θ = ξ/{denominator}")
    weights = out.patch_weights[index]
    cut = 1.0 / weights.numel() if model.selection == "above_uniform" else None
    return ThresholdView(weights, cut, "α_m (attention weight)", "1/M")


@dataclass
class Breakdown:
    """Eq. 5 with the numbers of one image: z = Σ_m α_m O_m, term by term.

    ``patches`` are the heaviest patches (at most the requested number, and only those the
    threshold kept), ``classes`` the highest image logits; ``logits[i][j]``
    is O_m[k] of patch ``patches[i]`` for class ``classes[j]``. The other patches' terms are
    summed in ``rest``. ``exact`` says whether the head's image logit really is that weighted
    sum (conv Loss-Attention and the pooling baselines; not the capsule heads, whose patch logits
    sum the capsule channels unweighted)."""

    patches: list[int]
    classes: list[int]
    weights: list[float]
    logits: list[list[float]]
    rest_count: int
    rest_weight: float
    rest: list[float]
    z: list[float]
    probabilities: list[float]
    exact: bool


def prediction_breakdown(out: PatchOutput, index: int, multilabel: bool, *, patches: int = 5,
                         classes: int = 3) -> Breakdown:
    if out.patch_weights is None or out.patch_logits is None:
        raise ValueError("this head has no patch logits to break the prediction into")
    alpha = out.patch_weights[index].double()
    logits = out.patch_logits[index].double()
    z = out.logits[index].double()
    probabilities = torch.sigmoid(z) if multilabel else torch.softmax(z, 0)
    top = alpha.argsort(descending=True)[:max(1, min(patches, int((alpha > 0).sum())))]
    shown = z.argsort(descending=True)[:classes]
    others = torch.ones_like(alpha, dtype=torch.bool)
    others[top] = False
    terms = alpha[:, None] * logits
    rebuilt = terms.sum(0)
    return Breakdown(
        patches=top.tolist(), classes=shown.tolist(), weights=alpha[top].tolist(),
        logits=logits[top][:, shown].tolist(), rest_count=int(others.sum()),
        rest_weight=float(alpha[others].sum()), rest=terms[others][:, shown].sum(0).tolist(),
        z=z[shown].tolist(), probabilities=probabilities[shown].tolist(),
        exact=bool(torch.allclose(rebuilt, z, rtol=1e-4, atol=1e-4)))


ABLATION_IGNORED = ("name", "tags", "notes", "preset")
"""Run-config keys that do not make two runs different experiments."""


def patch_loss_partner(mine: dict, theirs: dict) -> bool:
    """Whether two run configs are Table VI's ablation pair: identical (model, data, schedule,
    seed) except the patch loss, switched off (γmax = 0) in exactly one of them."""
    def without_gamma(config: dict) -> tuple[dict, float]:
        # Through RunConfig, so that fields added since one of them was trained take their
        # defaults in both.
        full = config_to_dict(config_from_dict(RunConfig, config))
        rest = {k: v for k, v in full.items() if k not in ABLATION_IGNORED}
        loss = dict(rest.get("loss") or {})
        gamma = float(loss.pop("gamma_max", 0.1))
        # The ramp only matters where the patch loss exists.
        loss.pop("ramp_epochs", None)
        loss.pop("ramp_by", None)
        return {**rest, "loss": loss}, gamma

    a, gamma_a = without_gamma(mine)
    b, gamma_b = without_gamma(theirs)
    return a == b and (gamma_a == 0) != (gamma_b == 0)


HOW_IT_RAN = ("train.threads", "train.device", "train.checkpoint_minutes",
              "train.data_on_device", "train.compile")
"""Config fields that say how a run was computed, not what was trained: two runs that differ
only in them are the same experiment."""
RAMP = ("loss.ramp_epochs", "loss.ramp_by")
"""The patch loss's ramp-up: it only matters where the patch loss exists (γmax > 0)."""


def flat_config(config: dict) -> dict[str, object]:
    """A run config as ``section.field`` -> value (JSON text), through RunConfig so that fields
    added since a run was trained take their defaults; what makes an experiment only (no
    name, tags, notes, preset name, nor :data:`HOW_IT_RAN`). Raises ValueError for a config
    that does not validate."""
    full = config_to_dict(config_from_dict(RunConfig, config))
    flat = {}
    for section, part in full.items():
        if section in ABLATION_IGNORED:
            continue
        if isinstance(part, dict):
            flat.update({f"{section}.{k}": json.dumps(v, sort_keys=True) for k, v in part.items()})
        else:
            flat[section] = json.dumps(part, sort_keys=True)
    return {k: v for k, v in flat.items() if k not in HOW_IT_RAN}


def gamma_of_config(config: dict) -> float:
    return float(json.loads(flat_config(config)["loss.gamma_max"]))


def gamma_families(configs: dict[str, dict]) -> list[dict[float, str]]:
    """The γmax families among labelled run configs: sets of models that are one experiment
    except for γmax, as {γmax: label} (ascending, at least two values; the first label of a
    repeated γmax). A γmax = 0 model joins every family it matches regardless of the ramp,
    which it does not use. Configs that do not validate are left out."""
    flats = {}
    for label, config in configs.items():
        try:
            flats[label] = flat_config(config)
        except ValueError:
            continue

    def key(flat: dict, ramp: bool) -> str:
        return json.dumps({k: v for k, v in flat.items()
                           if k != "loss.gamma_max" and (ramp or k not in RAMP)}, sort_keys=True)

    families: dict[str, dict[float, str]] = {}
    loose: dict[str, str] = {}  # a family's key with the ramp -> without it
    zeros = []
    for label, flat in flats.items():
        gamma = float(json.loads(flat["loss.gamma_max"]))
        if gamma == 0:
            zeros.append((label, key(flat, False)))
            continue
        k = key(flat, True)
        families.setdefault(k, {}).setdefault(gamma, label)
        loose[k] = key(flat, False)
    for label, k in zeros:
        matched = [fk for fk, lk in loose.items() if lk == k]
        for fk in matched or [f"zero:{k}"]:
            families.setdefault(fk, {}).setdefault(0.0, label)
    return [dict(sorted(f.items())) for f in families.values() if len(f) >= 2]


def varied_fields_beyond_gamma(configs: list[dict]) -> list[str]:
    """The experiment fields (``section.field``) whose values differ between the configs,
    γmax aside (and the ramp, when some model has no patch loss): why they are no γmax
    family."""
    flats = [flat_config(c) for c in configs]
    zero = any(float(json.loads(f["loss.gamma_max"])) == 0 for f in flats)
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if k != "loss.gamma_max" and not (zero and k in RAMP)
            and len({f.get(k) for f in flats}) > 1]


def free_energy(logits: torch.Tensor) -> torch.Tensor:
    """−logsumexp(z) per image (Liu et al. 2020, "Energy-based out-of-distribution
    detection"): low for inputs like the training data, high for inputs the model finds no
    class for."""
    return -torch.logsumexp(logits.double(), dim=-1)


def energy_rank(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """The share of the reference images (the test set) whose free energy is below this
    image's: near 1, the model was less sure of this input than of almost any test image."""
    reference = free_energy(reference_logits)
    return float((reference < free_energy(logits[None])[0]).double().mean())
