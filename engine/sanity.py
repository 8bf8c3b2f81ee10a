"""The model-randomisation sanity check (Adebayo et al. 2018, "Sanity checks for saliency maps").

The weights are re-initialised in a cascade from the top of the network down: the classifier,
then the patch layer, then the backbone a block of layers at a time. An explanation that
depends on what the model learned changes as its layers lose their training; one that does not
(an edge detector in disguise) stays the same. Each step's map is compared with the trained
model's by Spearman rank correlation, per image (and by SSIM, the paper's second measure).

One image tells little (its rank correlation can go 0.78 -> 0.52 -> 0.31 -> 0.06 -> 0.70 as
layers are randomised), so the check runs over a sample of test images:
:func:`summarise_steps` gives each step's mean, sd and 95 % interval over the images, and
:func:`verdict` judges a method by :data:`CRITERION`, this project's operationalisation of the
paper's pass / fail reasoning (the paper itself gives no threshold).

The copies are made here and never touch the model passed in; the re-initialisation is seeded
and does not disturb the global random state.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.data.base import ImageSet, model_input
from engine.explain import ONE_PASS, backbone_pass, classes_to_explain, one_pass_maps
from engine.models import PatchModel

BACKBONE_GROUPS = 4
"""The backbone is randomised in at most this many blocks of consecutive layers."""

PASS_BELOW = 0.5
"""The rank correlation a randomised model's maps must stay below: halfway between an unchanged
map (1) and an unrelated one (0)."""
CONFIDENCE = 0.95
"""The level of each step's interval for the mean rank correlation (Student's t)."""
CRITERION = (
    "A method passes when, at every step from the one where the whole head (the classifier, "
    "and a patch model's patch layer) is random to the last (every layer random), the upper "
    f"end of the {100 * CONFIDENCE:.0f} % interval of the mean rank correlation with the "
    f"trained model's maps is below {PASS_BELOW}. It fails when at one of those steps even the "
    f"lower end is at or above {PASS_BELOW}; otherwise it is unclear (more images would tell).")
"""The pass criterion, in the words the page shows: this project's operationalisation of
Adebayo et al., "Sanity Checks for Saliency Maps" (NeurIPS 2018). Their reasoning: a map that
explains a model must depend on its learned weights, so it must change as the weights are
re-initialised, in a cascade from the top layer down; a map that stays the same is closer to an
edge detector than to an explanation. Guided BackProp and Guided Grad-CAM fail their test by
staying similar while the higher layers are randomised, which is why the judged steps start
where the head, the top of the network, is random, and include every later step. The paper
reports Spearman rank correlation (with and without absolute values), SSIM and HOG similarity
without a threshold; the halfway line :data:`PASS_BELOW` and the interval for the mean over
the images are this project's choice. The maps compared are never negative, so the rank
correlation with and without absolute values is one number; SSIM is shown beside it."""


def _layers(module: nn.Module) -> list[nn.Module]:
    """The modules holding parameters directly, in definition order."""
    return [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]


def cascade_units(model: PatchModel) -> list[tuple[str, list[nn.Module]]]:
    """(label, modules) to re-initialise at each step, top first: the classifier, the rest of
    the head, then the backbone in up to :data:`BACKBONE_GROUPS` blocks from its last layers
    to its first."""
    head = model.head
    units = [("classifier", [head.fc])]
    rest = [m for m in _layers(head) if m is not head.fc]
    if rest:
        units.append(("patch layer" if head.has_patches else "head", rest))
    layers = _layers(model.backbone)
    size = max(1, -(-len(layers) // BACKBONE_GROUPS))
    blocks = [layers[i:i + size] for i in range(0, len(layers), size)]
    for k, block in enumerate(reversed(blocks)):
        first = len(layers) - sum(len(b) for b in blocks[len(blocks) - k - 1:]) + 1
        units.append((f"backbone {first}-{first + len(block) - 1}/{len(layers)}", block))
    return units


def randomised_copy(model: PatchModel, steps: int, seed: int = 0) -> PatchModel:
    """A copy of ``model`` with the first ``steps`` cascade units re-initialised (seeded)."""
    twin = copy.deepcopy(model).eval()
    units = cascade_units(twin)[:steps]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, modules in units:
            for module in modules:
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                if hasattr(module, "reset_running_stats"):
                    module.reset_running_stats()
    return twin


def spearman_rows(maps: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each map in ``maps`` (N, ...) with the one ``reference`` (...) : the
    Pearson correlation of their ranks (ties share their mean rank, as in scipy's spearmanr),
    all rows at once. NaN for a constant map. The maps compared here are never negative, so
    the paper's "with absolute values" variant is the same number."""
    from scipy.stats import rankdata

    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    ranks = rankdata(flat, axis=1)
    ref = rankdata(np.ravel(reference))
    ranks -= ranks.mean(axis=1, keepdims=True)
    ref = ref - ref.mean()
    norm = np.sqrt((ranks ** 2).sum(axis=1) * (ref ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = ranks @ ref / norm
    rho[(np.ptp(flat, axis=1) == 0) | (np.ptp(reference) == 0)] = np.nan
    return np.clip(rho, -1.0, 1.0)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Structural similarity of two maps of one shape (Wang et al. 2004), as scikit-image
    computes it (its defaults: a uniform 7x7 window, K1 = 0.01, K2 = 0.03, sample (co)variances,
    the mean over the window positions that fit inside the map): 1 for the same map. Maps here
    are scaled to [0, 1], hence ``data_range`` 1. A map smaller than 7 pixels a side is compared
    with the largest odd window that fits."""
    from skimage.metrics import structural_similarity

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    side = min(7, *a.shape)
    return float(structural_similarity(a, b, win_size=side - 1 + side % 2,
                                       data_range=data_range))


@dataclass(frozen=True)
class StepSummary:
    """One cascade step's similarities over the images: their mean and sd, the images that
    count (a constant map has no ranking: NaN, left out) and the interval for the mean."""
    mean: float
    sd: float
    n: int
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.sd:.2f}"


def summarise_steps(values: np.ndarray, confidence: float = CONFIDENCE) -> list[StepSummary]:
    """Per step (a row of ``values``, (steps, images)): mean, sample sd and the Student-t
    interval for the mean, NaNs left out. With fewer than two values the interval is NaN."""
    from scipy.stats import t

    out = []
    for row in np.asarray(values, dtype=np.float64):
        kept = row[~np.isnan(row)]
        n = len(kept)
        mean = float(kept.mean()) if n else float("nan")
        sd = float(kept.std(ddof=1)) if n > 1 else float("nan")
        half = float(t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n)) if n > 1 else \
            float("nan")
        out.append(StepSummary(mean, sd, n, mean - half, mean + half))
    return out


@dataclass(frozen=True)
class Verdict:
    """``outcome``: "passes", "fails" or "unclear"; ``reason``: why, in plain words."""
    outcome: str
    reason: str

    @property
    def text(self) -> str:
        return f"{self.outcome}: {self.reason}"


def verdict(summary: Sequence[StepSummary], labels: Sequence[str], judged_from: int,
            threshold: float = PASS_BELOW) -> Verdict:
    """Judge one method's cascade by :data:`CRITERION`: over the steps from ``judged_from``
    (the whole head random) to the last, it passes when every step's interval lies below
    ``threshold``, fails when one step's interval lies at or above it, and is unclear
    otherwise (or when a step has fewer than two rankable maps)."""
    judged = list(range(judged_from, len(summary)))
    few = [k for k in judged if summary[k].n < 2]
    if few:
        return Verdict("unclear", f"at '{labels[few[0]]}' fewer than two maps could "
                                  "be ranked (constant maps); use more images")
    stuck = [k for k in judged if summary[k].low >= threshold]
    if stuck:
        k = max(stuck, key=lambda j: summary[j].low)
        return Verdict("fails", f"at '{labels[k]}' its maps still rank the pixels like "
                                f"the trained model's (ρ = {summary[k]}, {_interval(summary[k])}, "
                                f"all at or above {threshold}): much of each map does not "
                                "come from the weights randomised so far")
    open_ = [k for k in judged if summary[k].high >= threshold]
    if open_:
        k = max(open_, key=lambda j: summary[j].high)
        return Verdict("unclear", f"at '{labels[k]}' ρ = {summary[k]} and its "
                                  f"{_interval(summary[k])} reaches {threshold}; more images "
                                  "would tell")
    k = max(judged, key=lambda j: summary[j].high)
    return Verdict("passes", f"from '{labels[judged_from]}' on its maps rank the pixels "
                             f"unlike the trained model's (highest: ρ = {summary[k]} at "
                             f"'{labels[k]}', {_interval(summary[k])}, below {threshold})")


def _interval(step: StepSummary) -> str:
    return f"{100 * CONFIDENCE:.0f} % interval {step.low:.2f} to {step.high:.2f}"


def cascade_maps(model: PatchModel, data: ImageSet, indices: Sequence[int], choice: str,
                 methods: Sequence[str], xi: float | None = None, seed: int = 0) -> dict:
    """Each one-pass method's maps at every cascade step, with their rank correlation to the
    trained model's maps. The class explained is fixed by the trained model (``choice``,
    :func:`engine.explain.classes_to_explain`), so that every step explains the same class.

    Returns ``{"steps": [labels], "maps": {method: (steps + 1, B, H, W)},
    "rho": {method: (steps + 1, B)}, "ssim": {method: (steps + 1, B)}, "classes": [...],
    "judged_from": k}``; step 0 is the trained model, step ``k`` the first with the whole head
    random (where :func:`verdict` starts judging)."""
    unknown = [m for m in methods if m not in ONE_PASS]
    if unknown:
        raise ValueError(f"the sanity check runs the one-pass methods {list(ONE_PASS)}; "
                         f"got {unknown}")
    model.eval()
    device = next(model.parameters()).device
    index = torch.as_tensor(list(indices))
    x = model_input(data, data.images[index], device)
    size = tuple(x.shape[-2:])
    units = cascade_units(model)
    labels = ["trained", *[f"+ {label}" if k else label for k, (label, _) in enumerate(units)]]
    maps = {m: [] for m in methods}
    classes = None
    for step in range(len(labels)):
        twin = model if step == 0 else randomised_copy(model, step, seed)
        features, out = backbone_pass(twin, x, xi)
        if classes is None:
            classes = classes_to_explain(data, index, out.logits.float().cpu(), choice)
        made = one_pass_maps(twin, features, out, classes.to(device), methods, size, xi)
        for m in methods:
            maps[m].append(made[m].cpu().numpy())
    stacked = {m: np.stack(v) for m, v in maps.items()}
    rho = {m: np.stack([spearman_rows(v[:, b], v[0, b]) for b in range(v.shape[1])], axis=1)
           for m, v in stacked.items()}
    similar = {m: np.array([[ssim(v[s, b], v[0, b]) for b in range(v.shape[1])]
                            for s in range(v.shape[0])]) for m, v in stacked.items()}
    head = sum(not label.startswith("backbone") for label, _ in units)
    return {"steps": labels, "maps": stacked, "rho": rho, "ssim": similar,
            "classes": classes.tolist(), "judged_from": head}


def cascade_similarity(model: PatchModel, data: ImageSet, indices: Sequence[int], choice: str,
                       methods: Sequence[str], xi: float | None = None, seed: int = 0) -> dict:
    """:func:`cascade_maps` without the maps: what the statistics need, small enough to keep
    for many images (the maps of 128 large images at every step would not be)."""
    out = cascade_maps(model, data, indices, choice, methods, xi, seed)
    del out["maps"]
    return out


def join_cascades(parts: Sequence[dict]) -> dict:
    """Cascades of the same model and methods over different images, as one: their images
    side by side. The randomised copies are seeded, so the parts share the same weights."""
    first = parts[0]
    return {"steps": first["steps"], "judged_from": first["judged_from"],
            "classes": [c for p in parts for c in p["classes"]],
            **{key: {m: np.concatenate([p[key][m] for p in parts], axis=1) for m in first[key]}
               for key in ("rho", "ssim")}}
