"""Explanation maps at input resolution, and how faithful they are.

Maps (one value per input pixel, each map scaled to [0, 1] per image):
- ``loss_attention``: the patch weights painted onto their pixel boxes, overlapping boxes
  averaged (a pixel in no box gets 0). This is the weight the model actually pools with;
- ``gradcam``, ``gradcam++``, ``scorecam``: on the backbone's output feature map, upsampled
  bilinearly to the input. Grad-CAM and Grad-CAM++ are computed here, with the ``grad-cam``
  package's definitions (tests hold them to the package's maps): the gradients they weigh are
  the same, so one backbone pass and one backward pass through the head give both and the
  Loss-Attention map (:data:`ONE_PASS`). Score-CAM, a forward pass per feature channel and image,
  comes from the package, whose hooks are released when each call ends.

Faithfulness (for a class c: the true label, or the top-scoring true label if multi-label; the
score is the softmax probability, or the sigmoid for multi-label models):
- **Average Drop %** and **Increase in Confidence %** (Chattopadhyay et al. 2018, Grad-CAM++):
  the masked image is map · x + (1 - map) · fill in [0, 1] pixel space, then normalised as
  usual; the fill is the ``mask`` (:data:`MASKS`): ``black`` (0: the image times the map, the
  default), ``mean`` (the data set's mean colour, its normalisation mean: what multiplying the
  normalised tensor by the map gives) or ``blur`` (the image's blurred copy, as insertion's).
  AD = 100 · mean(max(0, Y - O) / Y), IC = 100 · mean(O > Y), where Y and O are the scores of
  the original and masked images.
- **Deletion / insertion AUC** (Petsiuk et al. 2018, RISE): pixels are removed (deletion, set to
  the mask's fill: black by default, as RISE) or inserted into a blurred copy of the image
  (insertion, whatever the mask; Gaussian blur, σ = side / 8) in ``steps`` equal chunks, most
  important first. AUC = the trapezoid mean of the score curve. Lower deletion and higher
  insertion mean a more faithful map.
- **Reference maps** (:data:`REFERENCES`), judged the same way beside the methods: maps that know
  nothing of the model, so the reader sees where no knowledge lands (docs/faithfulness.md).
- **Pointing game** (Zhang et al. 2016): a hit when the map's maximum lies within ``tolerance``
  pixels (default 15) of a box of class c. **Energy pointing game** (Wang et al. 2020, Score-CAM):
  the share of the map's sum that falls inside the boxes of class c.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, MutableMapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.data.base import ImageSet, model_input
from engine.metric_table import DEFAULT_MASK, MASKS, RANDOM_DRAWS
from engine.models import LogitsOnly, PatchGrid, PatchModel, PatchOutput

METHODS = {"loss_attention": "Loss-Attention", "gradcam": "Grad-CAM",
           "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM"}
"""Explanation methods and their display names."""
ONE_PASS = ("loss_attention", "gradcam", "gradcam++")
"""The methods whose maps come from one backbone pass (cheap enough to show at once)."""


def coverage(grid: PatchGrid) -> torch.Tensor:
    """(M, H, W) float mask: 1 where patch m's pixel box covers the pixel."""
    h, w = grid.input_size
    ys, xs = torch.arange(h), torch.arange(w)
    b = grid.boxes
    inside_y = (ys[None] >= b[:, 1:2]) & (ys[None] < b[:, 3:4])  # (M, H)
    inside_x = (xs[None] >= b[:, 0:1]) & (xs[None] < b[:, 2:3])  # (M, W)
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()


def patch_map(weights: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """(B, H, W): patch weights painted onto their boxes, overlaps averaged."""
    cover = coverage(grid).to(weights.device)
    painted = torch.einsum("bm,mhw->bhw", weights.float(), cover)
    return painted / cover.sum(0).clamp_min(1.0)


def scale_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map to [0, 1] (a constant map becomes 0)."""
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)


def read_by_patches(model: PatchModel, feature_size: tuple[int, int]) -> torch.Tensor | None:
    """(Hf, Wf) float mask of the backbone's feature cells that some patch reads; None for a
    head without patches (it reads the whole map).

    The patch layer's floor division can leave the last rows and columns of the feature map
    outside every patch (small_cnn at 32x32: a 16x16 map, patches over rows 0-14). The
    prediction cannot depend on them, but a CAM's channel weights still multiply their
    activations: that is the bright band Grad-CAM++ and Score-CAM drew on the bottom and right
    edges. The CAMs are computed on the cells the head reads. Exact for any kernel, stride,
    padding and dilation: the cells the patch conv's output depends on, by autograd."""
    geom = model.head.patch_geom() if model.head.has_patches else None
    if geom is None:
        return None
    probe = torch.ones(1, 1, *feature_size, requires_grad=True)
    with torch.enable_grad():
        out = F.conv2d(probe, torch.ones(1, 1, *geom.kernel), stride=geom.stride,
                       padding=geom.padding, dilation=geom.dilation)
        (grad,) = torch.autograd.grad(out.sum(), probe)
    return (grad[0, 0] > 0).float()


def cam_maps(model: PatchModel, x: torch.Tensor, classes: torch.Tensor, method: str,
             xi: float | None = None) -> torch.Tensor:
    """Grad-CAM family maps (B, H, W) in [0, 1] for the given classes, from the grad-cam
    package (the app uses it for Score-CAM; the tests, as the reference for the others)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM}[method]
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    # The feature map's size from the layer geometry (PatchGrid.feature_size), not a forward.
    grid = model.grid(tuple(x.shape[-2:])) if model.head.has_patches else None
    read = None if grid is None else read_by_patches(model, grid.feature_size)
    masked = None if read is None else (lambda t: t * read.to(t.device, t.dtype))
    # The package prints progress bars (ScoreCAM); the context manager releases its hooks.
    maps = None
    with cls(model=LogitsOnly(model, xi), target_layers=[model.backbone],
             reshape_transform=masked) as cam, contextlib.redirect_stderr(io.StringIO()):
        cam.batch_size = 128
        maps = cam(input_tensor=x, targets=targets)
    if maps is None:  # the package's __exit__ swallows an IndexError (a class out of range)
        raise ValueError(f"{method} could not explain classes {classes.tolist()} of a model with "
                         f"{model.config.num_classes} classes")
    return scale_maps(torch.from_numpy(maps).float())


def backbone_pass(model: PatchModel, x: torch.Tensor, xi: float | None = None
                  ) -> tuple[torch.Tensor, PatchOutput]:
    """The backbone's feature map of ``x`` and the model's outputs at ``xi``, without gradients."""
    if x.dim() != 4 or x.shape[1] != model.config.in_chans:  # as PatchModel.encode says it
        raise ValueError(f"expected images of shape (B, {model.config.in_chans}, H, W); "
                         f"got {tuple(x.shape)}")
    with torch.no_grad():
        features = model.backbone(x)
        out = model.decode(model.head.encode(features), model.grid(x.shape[-2:]), xi)
    return features, out


def gradient_cams(model: PatchModel, features: torch.Tensor, classes: torch.Tensor,
                  input_size: tuple[int, int], methods: Sequence[str], xi: float | None = None
                  ) -> dict[str, torch.Tensor]:
    """Grad-CAM and / or Grad-CAM++ maps (B, H, W) in [0, 1] from the backbone's feature map.

    The gradients of the class logits (at ``xi``, default the model's own, as the package sees
    the model through :class:`LogitsOnly`) with respect to the feature map need only the head,
    so the backward pass stops there."""
    k = model.config.num_classes
    if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= k):
        raise ValueError(f"{methods[0]} could not explain classes {classes.tolist()} of a model "
                         f"with {k} classes")
    leaf = features.detach().requires_grad_()
    with torch.enable_grad():
        logits = model.decode(model.head.encode(leaf), model.grid(input_size), xi).logits
        (grads,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), leaf)
    acts, grads = features.detach().float(), grads.float()
    read = read_by_patches(model, tuple(acts.shape[-2:]))
    if read is not None:  # only the cells the head reads (see read_by_patches)
        read = read.to(acts.device)
        acts, grads = acts * read, grads * read
    maps = {}
    for method in methods:
        if method == "gradcam":
            weights = grads.mean((2, 3))
        else:  # Grad-CAM++ (Chattopadhyay et al. 2018, Eq. 19), as the package writes it
            squared = grads ** 2
            total = acts.sum((2, 3), keepdim=True)
            alpha = squared / (2 * squared + total * squared * grads + 1e-6)
            weights = (grads.clamp_min(0) * torch.where(grads != 0, alpha, 0)).sum((2, 3))
        cam = (weights[:, :, None, None] * acts).sum(1).clamp_min(0)
        up = F.interpolate(cam[:, None], size=tuple(input_size), mode="bilinear",
                           align_corners=False)[:, 0]
        maps[method] = scale_maps(up.cpu())
    return maps


def loss_attention_map(model: PatchModel, out: PatchOutput) -> torch.Tensor:
    if out.patch_weights is None:
        raise ValueError(f"model head {model.config.head!r} has no patch weights to map")
    return scale_maps(patch_map(out.patch_weights, out.grid).cpu())


def one_pass_maps(model: PatchModel, features: torch.Tensor, out: PatchOutput,
                  classes: torch.Tensor, methods: Sequence[str], input_size: tuple[int, int],
                  xi: float | None = None) -> dict[str, torch.Tensor]:
    """The maps of ``methods`` (all in :data:`ONE_PASS`) from one :func:`backbone_pass` made
    at ``xi``."""
    maps = {}
    if "loss_attention" in methods:
        maps["loss_attention"] = loss_attention_map(model, out)
    cams = [m for m in methods if m != "loss_attention"]
    if cams:
        maps.update(gradient_cams(model, features, classes, input_size, cams, xi))
    return {m: maps[m] for m in methods}


def explanation_maps(model: PatchModel, x: torch.Tensor, classes: torch.Tensor, method: str,
                     xi: float | None = None) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}; got {method!r}")
    classes = classes.to(x.device)
    if method not in ONE_PASS:
        return cam_maps(model, x, classes, method, xi)
    features, out = backbone_pass(model, x, xi)
    return one_pass_maps(model, features, out, classes, [method], tuple(x.shape[-2:]),
                         xi)[method]


# ----------------------------------------------------------------------------------------------
# Faithfulness


class Scorer:
    """Class scores of images given in [0, 1] pixel space (normalised here, batched)."""

    def __init__(self, model: PatchModel, data: ImageSet, device: torch.device,
                 batch_size: int = 256, xi: float | None = None) -> None:
        self.model, self.device, self.batch_size, self.xi = model, device, batch_size, xi
        self.data, self.multilabel = data, data.multilabel

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        scores = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = model_input(self.data, pixels[start:start + self.batch_size], self.device)
            logits = self.model(chunk, xi=self.xi).logits.float().cpu()
            probs = torch.sigmoid(logits) if self.multilabel else logits.softmax(1)
            scores.append(probs.gather(1, classes[start:start + self.batch_size, None]))
        return torch.cat(scores).squeeze(1)


def check_mask(mask: str) -> str:
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {list(MASKS)}; got {mask!r}")
    return mask


def mask_fill(pixels: torch.Tensor, mask: str, mean: Sequence[float] | None = None
              ) -> torch.Tensor:
    """What a left-out pixel becomes under ``mask`` (shaped as ``pixels``, in [0, 1]);
    ``mean``: the colour of ``"mean"`` (one value per channel)."""
    check_mask(mask)
    if mask == "black":
        return torch.zeros_like(pixels)
    if mask == "blur":
        return _blur(pixels)
    if mean is None:
        raise ValueError("the 'mean' mask needs the data set's mean colour")
    colour = torch.tensor([float(v) for v in mean], dtype=pixels.dtype).view(1, -1, 1, 1)
    return colour.expand_as(pixels).clone()


def masked_images(pixels: torch.Tensor, maps: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """map · x + (1 - map) · fill, per pixel (maps (B, H, W) in [0, 1])."""
    m = maps[:, None].to(pixels.dtype)
    return m * pixels + (1 - m) * fill


def average_drop_increase(scorer: Scorer, pixels: torch.Tensor, maps: torch.Tensor,
                          classes: torch.Tensor, base: torch.Tensor | None = None,
                          mask: str = DEFAULT_MASK, fill: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: relative drop max(0, Y-O)/Y and whether confidence increased (O > Y).
    ``fill``: :func:`mask_fill` made already (it does not depend on the map)."""
    y = scorer(pixels, classes) if base is None else base
    if fill is None and mask == "black":  # the paper's E ⊙ I, exactly
        masked = pixels * maps[:, None]
    else:
        fill = mask_fill(pixels, mask, scorer.data.mean) if fill is None else fill
        masked = masked_images(pixels, maps, fill)
    o = scorer(masked, classes)
    return (y - o).clamp_min(0) / y.clamp_min(1e-12), (o > y).float()


def _blur(pixels: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    sigma = max(pixels.shape[-1], pixels.shape[-2]) / 8
    kernel = min(2 * round(2 * sigma) + 1, 2 * (min(pixels.shape[-2:]) // 2) - 1)
    return gaussian_blur(pixels, [kernel, kernel], [sigma, sigma])


def deletion_insertion_curves(scorer: Scorer, pixels: torch.Tensor, maps: torch.Tensor,
                              classes: torch.Tensor, steps: int = 16,
                              fill: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the class score after each of ``steps`` + 1 deletion and insertion steps
    (B, steps + 1): the most important pixels first set to ``fill`` (default black, as RISE;
    see :func:`mask_fill`), or put back into a blurred copy."""
    b, _, h, w = pixels.shape
    rank = maps.flatten(1).argsort(1, descending=True).argsort(1)  # pixel -> importance rank
    blurred = _blur(pixels)
    removed = torch.zeros_like(pixels) if fill is None else fill
    deletion, insertion = [], []
    for s in range(steps + 1):
        first = (rank < round(s * h * w / steps)).view(b, 1, h, w)
        deletion.append(scorer(torch.where(first, removed, pixels), classes))
        insertion.append(scorer(torch.where(first, pixels, blurred), classes))
    return torch.stack(deletion, 1), torch.stack(insertion, 1)


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Trapezoid mean of (B, steps + 1) curves over [0, 1]."""
    steps = curves.shape[1] - 1
    return (curves.sum(1) - (curves[:, 0] + curves[:, -1]) / 2) / steps


def deletion_insertion(scorer: Scorer, pixels: torch.Tensor, maps: torch.Tensor,
                       classes: torch.Tensor, steps: int = 16
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image deletion and insertion AUC (trapezoid mean over ``steps`` + 1 points)."""
    deletion, insertion = deletion_insertion_curves(scorer, pixels, maps, classes, steps)
    return curve_auc(deletion), curve_auc(insertion)


def _class_boxes(data: ImageSet, indices: Sequence[int], classes: torch.Tensor
                 ) -> list[torch.Tensor]:
    out = []
    for i, c in zip(indices, classes.tolist(), strict=True):
        boxes = data.boxes(int(i))
        out.append(boxes[boxes[:, 0].long() == c, 1:5])
    return out


def pointing_game(maps: torch.Tensor, boxes: list[torch.Tensor], tolerance: float = 15.0
                  ) -> torch.Tensor:
    """Per image: 1 if the map's maximum is within ``tolerance`` px of a box (NaN: no box)."""
    w = maps.shape[-1]
    flat = maps.flatten(1).argmax(1)
    ys, xs = (flat // w).double() + 0.5, (flat % w).double() + 0.5  # pixel centres
    hits = []
    for y, x, b in zip(ys, xs, boxes, strict=True):
        if len(b) == 0:
            hits.append(float("nan"))
            continue
        b = b.double()
        dx = (torch.maximum(b[:, 0] - x, x - b[:, 2])).clamp_min(0)
        dy = (torch.maximum(b[:, 1] - y, y - b[:, 3])).clamp_min(0)
        hits.append(float(((dx ** 2 + dy ** 2).sqrt() <= tolerance).any()))
    return torch.tensor(hits)


def energy_pointing(maps: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """Per image: share of the map's sum inside the boxes (NaN: no box or an all-zero map)."""
    h, w = maps.shape[-2:]
    ys, xs = torch.arange(h)[:, None] + 0.5, torch.arange(w)[None, :] + 0.5
    shares = []
    for m, b in zip(maps, boxes, strict=True):
        total = m.sum()
        if len(b) == 0 or total <= 0:
            shares.append(float("nan"))
            continue
        inside = torch.zeros(h, w, dtype=torch.bool)
        for x0, y0, x1, y1 in b.tolist():
            inside |= (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
        shares.append(float((m * inside).sum() / total))
    return torch.tensor(shares)


def target_classes(data: ImageSet, indices: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """True class; for multi-label data, the top-scoring of the image's true labels."""
    targets = data.targets[indices]
    if not data.multilabel:
        return targets.long()
    masked = torch.where(targets > 0, logits, torch.full_like(logits, float("-inf")))
    return masked.argmax(1)


CLASS_CHOICES = {"true": "true label (multi-label: top-scoring true label)",
                 "predicted": "predicted class"}


def classes_to_explain(data: ImageSet, indices: torch.Tensor, logits: torch.Tensor,
                       choice: str) -> torch.Tensor:
    """``"true"`` (the target class), ``"predicted"``, or one class name for every image."""
    if choice == "predicted":
        return logits.argmax(1)
    if choice == "true":
        return target_classes(data, indices, logits)
    if choice not in data.classes:
        raise ValueError(f"class to explain must be 'true', 'predicted' or one of "
                         f"{data.classes[:10]}; got {choice!r}")
    return torch.full((len(indices),), data.classes.index(choice))


def compare_maps(model: PatchModel, data: ImageSet, indices: torch.Tensor, choice: str,
                 methods: Sequence[str], xi: float | None = None) -> dict:
    """Every method's map (numpy (B, H, W) in [0, 1]) of the images ``indices``, explaining
    the class ``choice`` (:func:`classes_to_explain`); with the classes and predictions. The
    :data:`ONE_PASS` methods share one backbone pass, which also gives the predictions."""
    model.eval()
    device = next(model.parameters()).device
    x = model_input(data, data.images[indices], device)
    features, out = backbone_pass(model, x, xi)
    logits = out.logits.float().cpu()
    classes = classes_to_explain(data, indices, logits, choice).to(device)
    fast = [m for m in methods if m in ONE_PASS]
    maps = one_pass_maps(model, features, out, classes, fast, tuple(x.shape[-2:]), xi)
    maps.update({m: explanation_maps(model, x, classes, m, xi=xi) for m in methods
                 if m not in ONE_PASS})
    return {"indices": indices.tolist(), "classes": classes.tolist(),
            "predicted": logits.argmax(1).tolist(),
            "maps": {m: maps[m].cpu().numpy() for m in methods}}


def remembered_maps(memo: MutableMapping, model: PatchModel, data: ImageSet,
                    indices: Sequence[int], classes: Sequence[int], method: str,
                    limit: int = 512, xi: float | None = None) -> np.ndarray:
    """``method``'s maps (numpy (B, H, W)) of the images ``indices`` explaining ``classes``.

    ``memo`` maps (image index, class) to a map made earlier for the same model and data: those
    are reused, the rest computed in one batch and added (the least recently used dropped beyond
    ``limit``). For maps that depend on nothing else, as the CAMs (which explain the logits at
    ``xi``: keep one memo per ξ): a second look at an image costs nothing, even among other
    images. Callers that share a memo between threads hold a lock around this call."""
    keys = [(int(i), int(c)) for i, c in zip(indices, classes, strict=True)]
    missing = list(dict.fromkeys(k for k in keys if k not in memo))
    if missing:
        model.eval()
        device = next(model.parameters()).device
        x = model_input(data, data.images[torch.tensor([i for i, _ in missing])], device)
        made = explanation_maps(model, x, torch.tensor([c for _, c in missing], device=device),
                                method, xi).cpu().numpy()
        memo.update(zip(missing, made, strict=True))
    maps = np.stack([memo[k] for k in keys])
    for key in keys:  # now the most recently used: evicted last
        memo[key] = memo.pop(key)
    for old in list(memo)[:max(0, len(memo) - limit)]:
        del memo[old]
    return maps


MapFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(normalised inputs on the device, classes) -> maps (B, H, W) in [0, 1] on the CPU."""


REFERENCES = {"uniform": "ref: uniform", "random": "ref: random", "centre": "ref: centre",
              "intensity": "ref: intensity"}
"""Reference maps (no knowledge of the model) and their display names: ``uniform``, every pixel
1; ``random``, every pixel uniform in [0, 1], a fresh draw per image and per repeat (metrics
averaged over ``draws`` seeded repeats); ``centre``, an isotropic Gaussian at the image's centre
with σ = a quarter of the shorter side, min-max scaled; ``intensity``, the image's grey level
(mean over channels), min-max scaled per image."""


def reference_maps(name: str, pixels: torch.Tensor, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """The reference map ``name`` (:data:`REFERENCES`) of ``pixels`` (B, C, H, W) in [0, 1]:
    (B, H, W) in [0, 1]. ``random`` draws from ``generator``."""
    b, _, h, w = pixels.shape
    if name == "uniform":
        return torch.ones(b, h, w)
    if name == "random":
        return torch.rand(b, h, w, generator=generator)
    if name == "centre":
        ys = torch.arange(h, dtype=torch.float64) + 0.5 - h / 2
        xs = torch.arange(w, dtype=torch.float64) + 0.5 - w / 2
        sigma = min(h, w) / 4
        gauss = torch.exp(-(ys[:, None] ** 2 + xs[None] ** 2) / (2 * sigma ** 2)).float()
        return scale_maps(gauss.expand(b, h, w).clone())
    if name == "intensity":
        return scale_maps(pixels.float().mean(1))
    raise ValueError(f"reference map must be one of {list(REFERENCES)}; got {name!r}")


def check_references(references: Sequence[str], draws: int) -> None:
    unknown = [r for r in references if r not in REFERENCES]
    if unknown:
        raise ValueError(f"reference maps must be among {list(REFERENCES)}; got {unknown}")
    if "random" in references and (isinstance(draws, bool) or not isinstance(draws, int)
                                   or draws < 1):
        raise ValueError(f"the random reference needs draws >= 1 (repeats averaged); got "
                         f"{draws!r}")


class _Judge:
    """Every faithfulness metric of a set of maps, on fixed images, classes and mask."""

    def __init__(self, scorer: Scorer, pixels: torch.Tensor, classes: torch.Tensor,
                 boxes: list[torch.Tensor] | None, mask: str, steps: int, tolerance: float):
        self.scorer, self.pixels, self.classes, self.boxes = scorer, pixels, classes, boxes
        self.mask, self.steps, self.tolerance = mask, steps, tolerance
        self.fill = mask_fill(pixels, mask, scorer.data.mean)
        self.base = scorer(pixels, classes)

    def __call__(self, maps: torch.Tensor) -> tuple[dict, dict]:
        """The metrics row (means over the images) and the mean curves."""
        row, curves, _ = self.measure(maps)
        return row, curves

    def measure(self, maps: torch.Tensor) -> tuple[dict, dict, dict]:
        """The row and curves of :meth:`__call__`, and each metric's per-image values (lists,
        NaN where a pointing game has no box), which paired intervals between maps need."""
        fill = None if self.mask == "black" else self.fill  # black: the paper's E ⊙ I, exactly
        drop, increase = average_drop_increase(self.scorer, self.pixels, maps, self.classes,
                                               self.base, self.mask, fill)
        deleted, inserted = deletion_insertion_curves(self.scorer, self.pixels, maps,
                                                      self.classes, self.steps, self.fill)
        per_image = {"average_drop_pct": 100 * drop, "increase_in_confidence_pct": 100 * increase,
                     "deletion_auc": curve_auc(deleted), "insertion_auc": curve_auc(inserted)}
        if self.boxes is not None:
            per_image["pointing_game"] = pointing_game(maps, self.boxes, self.tolerance).float()
            per_image["energy_pointing_game"] = energy_pointing(maps, self.boxes).float()
        row = {"average_drop_pct": 100 * drop.mean().item(),
               "increase_in_confidence_pct": 100 * increase.mean().item(),
               "deletion_auc": per_image["deletion_auc"].mean().item(),
               "insertion_auc": per_image["insertion_auc"].mean().item()}
        for game in ("pointing_game", "energy_pointing_game"):
            if game in per_image:  # NaN where an image has no box of its class
                row[game] = torch.nanmean(per_image[game]).item()
        curves = {"deletion": deleted.mean(0).tolist(), "insertion": inserted.mean(0).tolist()}
        return row, curves, {k: v.float().tolist() for k, v in per_image.items()}

    def reference(self, name: str, draws: int, seed: int) -> tuple[dict, dict]:
        """A reference map's row and curves; ``random``: the means over ``draws`` repeats."""
        if name != "random":
            return self(reference_maps(name, self.pixels))
        gen = torch.Generator().manual_seed(seed)
        judged = [self(reference_maps(name, self.pixels, gen)) for _ in range(draws)]
        row = {k: sum(r[k] for r, _ in judged) / draws for k in judged[0][0]}
        curves = {k: [sum(v) / draws for v in zip(*(c[k] for _, c in judged), strict=True)]
                  for k in judged[0][1]}
        return row, curves


def faithfulness(model: PatchModel, data: ImageSet, device: torch.device,
                 indices: torch.Tensor, methods: Sequence[str] = METHODS, steps: int = 16,
                 tolerance: float = 15.0, xi: float | None = None,
                 extra: dict[str, MapFn] | None = None, choice: str = "true",
                 on_method: Callable[[str], None] | None = None, mask: str = DEFAULT_MASK,
                 references: Sequence[str] = (), draws: int = RANDOM_DRAWS, seed: int = 0
                 ) -> dict:
    """Mean faithfulness metrics per method on the images ``indices`` of ``data``, explaining
    the class ``choice`` (:func:`classes_to_explain`; the pointing games use that class's
    boxes), with the mean deletion and insertion curves; ``extra`` adds maps made elsewhere
    (e.g. a mutual-transfer peer's own attention map), judged the same way. ``mask``: what
    replaces left-out pixels (:data:`MASKS`). ``references``: reference maps
    (:data:`REFERENCES`) judged beside the methods, under ``"references"`` (``random``:
    ``draws`` repeats from ``seed``). ``on_method`` is called with each method's (and
    reference's) name once it is judged (a progress bar's step). Without boxes the pointing
    games are left out, and ``"skipped"`` says so. ``"per_image"[method][metric]``: the values
    per image, in the order of ``indices`` (for paired intervals, engine.intervals)."""
    check_mask(mask)
    check_references(references, draws)
    model.eval()
    pixels = data.images[indices].float() / 255.0
    x = model_input(data, data.images[indices], device)
    scorer = Scorer(model, data, device, xi=xi)
    with torch.no_grad():
        logits = model(x, xi=xi).logits.float().cpu()
    classes = classes_to_explain(data, indices, logits, choice)
    boxes = _class_boxes(data, indices.tolist(), classes) if data.has_boxes else None
    judge = _Judge(scorer, pixels, classes, boxes, mask, steps, tolerance)
    makers: dict[str, MapFn] = {
        m: (lambda x, c, m=m: explanation_maps(model, x, c.to(device), m, xi=xi).cpu())
        for m in methods}
    makers.update(extra or {})
    report, refs, curves, per_image = {}, {}, {}, {}
    for method, make in makers.items():
        report[method], curves[method], per_image[method] = judge.measure(make(x, classes))
        if on_method is not None:
            on_method(method)
    for name in references:
        refs[name], curves[name] = judge.reference(name, draws, seed)
        if on_method is not None:
            on_method(name)
    out = {"images": len(indices), "steps": steps, "pointing_tolerance_px": tolerance,
           "class": CLASS_CHOICES.get(choice, f"class {choice}"), "mask": mask,
           "methods": report, "curves": curves, "per_image": per_image}
    if references:
        out.update(references=refs, random_draws=draws, seed=seed)
    if boxes is None:
        out["skipped"] = (f"pointing game and energy pointing game: data set {data.name!r} "
                          "has no bounding boxes")
    return out
