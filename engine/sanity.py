"""The model-randomisation sanity check (Adebayo et al. 2018, "Sanity checks for saliency maps").

The weights are re-initialised in a cascade from the top of the network down: the classifier,
then the patch layer, then the backbone a block of layers at a time. An explanation that
depends on what the model learned changes as its layers lose their training; one that does not
(an edge detector in disguise) stays the same. Each step's map is compared with the trained
model's by Spearman rank correlation, per image.

The copies are made here and never touch the model passed in; the re-initialisation is seeded
and does not disturb the global random state.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from engine.data.base import ImageSet, model_input
from engine.explain import ONE_PASS, backbone_pass, classes_to_explain, one_pass_maps
from engine.models import PatchModel

BACKBONE_GROUPS = 4
"""The backbone is randomised in at most this many blocks of consecutive layers."""


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


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps (NaN where one is constant: no ranking to compare)."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def cascade_maps(model: PatchModel, data: ImageSet, indices: Sequence[int], choice: str,
                 methods: Sequence[str], xi: float | None = None, seed: int = 0) -> dict:
    """Each one-pass method's maps at every cascade step, with their rank correlation to the
    trained model's maps. The class explained is fixed by the trained model (``choice``,
    :func:`engine.explain.classes_to_explain`), so that every step explains the same class.

    Returns ``{"steps": [labels], "maps": {method: (steps + 1, B, H, W)},
    "rho": {method: (steps + 1, B)}}``; step 0 is the trained model."""
    unknown = [m for m in methods if m not in ONE_PASS]
    if unknown:
        raise ValueError(f"the sanity check runs the one-pass methods {list(ONE_PASS)}; "
                         f"got {unknown}")
    model.eval()
    device = next(model.parameters()).device
    index = torch.as_tensor(list(indices))
    x = model_input(data, data.images[index], device)
    size = tuple(x.shape[-2:])
    labels = ["trained", *[f"+ {label}" if k else label
                           for k, (label, _) in enumerate(cascade_units(model))]]
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
    rho = {m: np.array([[spearman(v[s, b], v[0, b]) for b in range(v.shape[1])]
                        for s in range(v.shape[0])]) for m, v in stacked.items()}
    return {"steps": labels, "maps": stacked, "rho": rho, "classes": classes.tolist()}
