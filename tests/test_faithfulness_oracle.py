"""Faithfulness and localisation metrics held to a library, or to the paper's formula (issue 32).

Quantus (a dev requirement: it is imported here, so a missing Quantus fails, never skips) is
the oracle where its definitions coincide with ours once configured to our choices; where they
differ by design, a test shows the difference and that the two agree once it is accounted for.
Average Drop and Increase in Confidence are computed here from Chattopadhyay et al. (2018).
docs/faithfulness_oracles.md says which library function checks what, with which settings.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import quantus
import torch
from torch import nn

from engine import explain as ex
from engine.data.base import ImageSet

SIDE, STEPS, CLASSES, N = 24, 12, 5, 6
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


class Linear(nn.Module):
    """A fixed linear classifier on normalised images, called as the project calls a model."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.fc = nn.Linear(3 * SIDE * SIDE, CLASSES)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(CLASSES, 3 * SIDE * SIDE, generator=gen) * 0.05)
            self.fc.bias.copy_(torch.randn(CLASSES, generator=gen))

    def forward(self, x: torch.Tensor, xi: float | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.fc(x.flatten(1)))


class PixelModel(nn.Module):
    """What Quantus calls: pixels in [0, 1] -> logits (it applies the softmax itself)."""

    def __init__(self, model: Linear) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std).logits


@pytest.fixture
def setup():
    """Scorer, pixels (N, 3, H, W) in [0.1, 1] (no black pixel), maps with distinct values
    (no ties in the ranking), the classes explained."""
    gen = torch.Generator().manual_seed(2)
    images = (torch.randint(26, 256, (N, 3, SIDE, SIDE), generator=gen)).to(torch.uint8)
    data = ImageSet(name="oracle", split="test", images=images,
                    targets=torch.zeros(N, dtype=torch.long),
                    classes=[str(k) for k in range(CLASSES)], multilabel=False,
                    mean=MEAN, std=STD)
    model = Linear().eval()
    scorer = ex.Scorer(model, data, torch.device("cpu"))
    pixels = images.float() / 255
    maps = ex.scale_maps(torch.rand(N, SIDE, SIDE, generator=gen))
    classes = torch.arange(N) % CLASSES
    return SimpleNamespace(scorer=scorer, model=model, pixels=pixels, maps=maps,
                           classes=classes)


def _pixel_flipping(s, maps: np.ndarray, pixels: torch.Tensor | None = None,
                    **settings) -> np.ndarray:
    """Quantus PixelFlipping curves (N, STEPS), on our pixels and maps as they are."""
    metric = quantus.PixelFlipping(features_in_step=3 * SIDE * SIDE // STEPS, abs=False,
                                   normalise=False, disable_warnings=True, **settings)
    x = (s.pixels if pixels is None else pixels).numpy()
    curves = metric(model=PixelModel(s.model).eval(), x_batch=x, y_batch=s.classes.numpy(),
                    a_batch=maps[:, None], channel_first=True, softmax=True, device="cpu")
    return np.asarray(curves)


# ----------------------------------------------------------------------------------------------
# Deletion (Petsiuk et al. 2018) against Quantus PixelFlipping (Bach et al. 2015)


@pytest.mark.parametrize("value", [None, 0.3])
def test_deletion_curve_is_quantus_pixel_flipping_after_the_first_point(setup, value):
    """Black (the default, as RISE), or a constant grey fill, against the same scalar baseline."""
    s = setup
    fill = None if value is None else torch.full_like(s.pixels, value)
    deletion, _ = ex.deletion_insertion_curves(s.scorer, s.pixels, s.maps, s.classes, STEPS,
                                               fill=fill)
    oracle = _pixel_flipping(s, s.maps.numpy(), perturb_baseline=value or 0.0)
    # Quantus records the score after each step only; our curve starts at the unperturbed image.
    assert oracle.shape == (N, STEPS) and deletion.shape == (N, STEPS + 1)
    np.testing.assert_allclose(deletion[:, 1:].numpy(), oracle, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(deletion[:, 0].numpy(),
                               s.scorer(s.pixels, s.classes).numpy(), rtol=1e-6)
    # Not a flat curve that anything would match: deleting changes the scores.
    assert np.ptp(oracle, axis=1).min() > 1e-3


def test_quantus_black_is_the_darkest_value_not_zero(setup):
    """Quantus's ``perturb_baseline="black"`` fills with each image's minimum; ours with 0. They
    agree on images whose darkest value is 0, and differ on the others (here: all)."""
    s = setup
    deletion, _ = ex.deletion_insertion_curves(s.scorer, s.pixels, s.maps, s.classes, STEPS)
    black = _pixel_flipping(s, s.maps.numpy(), perturb_baseline="black")
    assert float(s.pixels.amin()) > 0.09
    assert np.abs(deletion[:, 1:].numpy() - black).max() > 1e-3
    darkest = s.pixels.clone()
    darkest[:, 0, 0, 0] = 0.0  # one black value per image: its minimum is now 0
    deletion, _ = ex.deletion_insertion_curves(s.scorer, darkest, s.maps, s.classes, STEPS)
    black = _pixel_flipping(s, s.maps.numpy(), pixels=darkest, perturb_baseline="black")
    np.testing.assert_allclose(deletion[:, 1:].numpy(), black, rtol=1e-5, atol=1e-6)


def test_insertion_curve_is_quantus_pixel_flipping_of_the_least_important_onto_the_blur(setup):
    """No library has RISE insertion; but inserting the k most important pixels into the blurred
    copy is flipping the n - k least important ones to the blur: PixelFlipping with the map
    reversed and the blurred copy as the baseline gives our insertion curve backwards."""
    s = setup
    _, insertion = ex.deletion_insertion_curves(s.scorer, s.pixels, s.maps, s.classes, STEPS)
    blurred = ex._blur(s.pixels).numpy().reshape(N, -1)

    def to_blur(arr, indices, **_):
        out = arr.copy()
        rows = np.arange(len(arr))[:, None]
        out[rows, indices] = blurred[rows, indices]
        return out

    oracle = _pixel_flipping(s, -s.maps.numpy(), perturb_func=to_blur)
    # Quantus step k blurs the k least important chunks = our insertion step STEPS - k.
    np.testing.assert_allclose(insertion[:, :-1].numpy(), oracle[:, ::-1], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(insertion[:, -1].numpy(),
                               s.scorer(s.pixels, s.classes).numpy(), rtol=1e-6)
    assert np.ptp(oracle, axis=1).min() > 1e-3


def test_auc_is_the_trapezoid_mean_quantus_sums_without_the_first_point(setup, monkeypatch):
    """Quantus's per-sample AUC is the trapezoid rule with dx = 1 over its curve (which has no
    unperturbed point); ours the trapezoid mean over [0, 1] of the whole curve. Quantus 0.6.0
    calls ``np.trapz``, which numpy 2.4 no longer has: patched to ``np.trapezoid``."""
    s = setup
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    deletion, _ = ex.deletion_insertion_curves(s.scorer, s.pixels, s.maps, s.classes, STEPS)
    ours = ex.curve_auc(deletion).numpy()
    theirs = _pixel_flipping(s, s.maps.numpy(), perturb_baseline=0.0,
                             return_auc_per_sample=True)
    first = deletion[:, 0].numpy()
    second = deletion[:, 1].numpy()
    # Adding the missing first trapezoid and dividing by the steps gives ours.
    np.testing.assert_allclose((theirs + (first + second) / 2) / STEPS, ours, rtol=1e-5)
    np.testing.assert_allclose(ours, np.trapezoid(deletion.numpy(), dx=1 / STEPS, axis=1),
                               rtol=1e-6)
    assert np.abs(theirs / STEPS - ours).min() > 1e-4  # the difference is real


# ----------------------------------------------------------------------------------------------
# Average Drop and Increase in Confidence: the Grad-CAM++ paper's formula, directly


def test_average_drop_and_increase_are_the_papers_formula(setup):
    s = setup
    # Per image, one class whose score rises when masked and one whose score falls: IC is
    # neither 0 nor 100 and the drop is neither.
    masked = s.pixels * s.maps[:, None]
    y_all = torch.stack([s.scorer(s.pixels, torch.full((N,), k)) for k in range(CLASSES)], 1)
    o_all = torch.stack([s.scorer(masked, torch.full((N,), k)) for k in range(CLASSES)], 1)
    rises = (o_all - y_all).argmax(1)
    falls = (o_all - y_all).argmin(1)
    classes = torch.where(torch.arange(N) % 2 == 0, rises, falls)
    assert ((o_all - y_all).gather(1, rises[:, None]) > 0).any()

    drops, increases = [], []
    for i in range(N):  # one image at a time, masked by hand
        image = s.pixels[i].numpy()
        hand = torch.from_numpy(image * s.maps[i].numpy()[None])
        c = classes[i:i + 1]
        y = float(s.scorer(s.pixels[i:i + 1], c))
        o = float(s.scorer(hand[None], c))
        drops.append(max(0.0, y - o) / y)
        increases.append(1.0 if y < o else 0.0)
    average_drop = 100 * sum(drops) / N
    increase = 100 * sum(increases) / N

    drop, inc = ex.average_drop_increase(s.scorer, s.pixels, s.maps, classes)
    assert 100 * float(drop.mean()) == pytest.approx(average_drop, rel=1e-5, abs=1e-9)
    assert 100 * float(inc.mean()) == increase
    assert 0 < increase < 100 and average_drop > 0.01
    # A map of ones changes nothing: O == Y exactly, no drop and no increase (1[Y < O] is 0).
    drop1, inc1 = ex.average_drop_increase(s.scorer, s.pixels, torch.ones_like(s.maps), classes)
    assert drop1.tolist() == [0.0] * N and inc1.tolist() == [0.0] * N
    base = s.scorer(s.pixels, classes)
    drop_b, inc_b = ex.average_drop_increase(s.scorer, s.pixels, s.maps, classes, base)
    assert torch.equal(drop_b, drop) and torch.equal(inc_b, inc)


# ----------------------------------------------------------------------------------------------
# Pointing game (Zhang et al. 2016) and energy pointing game (Wang et al. 2020)


def _box_masks(boxes: list[torch.Tensor]) -> np.ndarray:
    """(N, 1, H, W) masks of the pixels inside the half-open integer boxes (x0, y0, x1, y1)."""
    masks = np.zeros((len(boxes), 1, SIDE, SIDE), dtype=bool)
    for i, b in enumerate(boxes):
        for x0, y0, x1, y1 in b.long().tolist():
            masks[i, 0, y0:y1, x0:x1] = True
    return masks


BOXES = [torch.tensor([[2., 3., 10., 9.]]), torch.tensor([[12., 12., 24., 24.]]),
         torch.tensor([[0., 0., 5., 24.], [18., 2., 22., 6.]]), torch.tensor([[8., 8., 16., 16.]]),
         torch.tensor([[0., 0., 24., 1.]]), torch.tensor([[20., 20., 23., 23.]])]


def _peaked_maps() -> torch.Tensor:
    """Distinct-valued maps whose maxima fall inside some boxes and outside others."""
    gen = torch.Generator().manual_seed(3)
    maps = torch.rand(N, SIDE, SIDE, generator=gen) * 0.5
    for i, (y, x) in enumerate([(5, 4), (3, 3), (20, 19), (16, 8), (0, 23), (22, 22)]):
        maps[i, y, x] = 1.0
    return maps


def test_pointing_game_with_no_tolerance_is_quantus_pointing_game():
    maps = _peaked_maps()
    ours = ex.pointing_game(maps, BOXES, tolerance=0.0).numpy()
    theirs = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)(
        model=None, x_batch=np.zeros((N, 3, SIDE, SIDE), np.float32), y_batch=np.zeros(N, int),
        a_batch=maps.numpy()[:, None], s_batch=_box_masks(BOXES), channel_first=True)
    np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=float))
    assert 0 < ours.sum() < N  # hits and misses


def test_pointing_game_tolerance_is_quantus_on_boxes_grown_by_the_tolerance():
    """Quantus has no tolerance: the hit is the maximum inside the mask. Our 15 px tolerance is
    the box grown by 15 px (pixel centres within 15 px of the box): on those masks they agree."""
    maps = _peaked_maps()
    tolerance = 3.0
    ys, xs = np.mgrid[:SIDE, :SIDE] + 0.5
    grown = np.zeros((N, 1, SIDE, SIDE), dtype=bool)
    for i, b in enumerate(BOXES):
        for x0, y0, x1, y1 in b.tolist():
            dx = np.maximum(np.maximum(x0 - xs, xs - x1), 0)
            dy = np.maximum(np.maximum(y0 - ys, ys - y1), 0)
            grown[i, 0] |= np.hypot(dx, dy) <= tolerance
    theirs = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)(
        model=None, x_batch=np.zeros((N, 3, SIDE, SIDE), np.float32), y_batch=np.zeros(N, int),
        a_batch=maps.numpy()[:, None], s_batch=grown, channel_first=True)
    ours = ex.pointing_game(maps, BOXES, tolerance=tolerance).numpy()
    np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=float))
    assert ours.sum() > ex.pointing_game(maps, BOXES, tolerance=0.0).sum()


def test_pointing_game_ties_quantus_counts_any_maximum_we_the_first():
    """A plateau at the maximum (a Loss-Attention map paints one weight over a patch box):
    Quantus hits if any maximal pixel is in the box; ours looks at the first in row-major
    order only."""
    maps = torch.zeros(1, SIDE, SIDE)
    maps[0, 4:12, 4:12] = 1.0  # a patch-sized plateau
    boxes = [torch.tensor([[8., 8., 16., 16.]])]  # holds the plateau's lower right quarter
    theirs = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)(
        model=None, x_batch=np.zeros((1, 3, SIDE, SIDE), np.float32), y_batch=np.zeros(1, int),
        a_batch=maps.numpy()[:, None], s_batch=_box_masks(boxes), channel_first=True)
    assert list(np.asarray(theirs, dtype=float)) == [1.0]
    assert ex.pointing_game(maps, boxes, tolerance=0.0).tolist() == [0.0]


def test_energy_pointing_is_quantus_relevance_mass_accuracy():
    maps = _peaked_maps()
    ours = ex.energy_pointing(maps, BOXES).numpy()
    theirs = quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True)(
        model=None, x_batch=np.zeros((N, 3, SIDE, SIDE), np.float32), y_batch=np.zeros(N, int),
        a_batch=maps.numpy()[:, None], s_batch=_box_masks(BOXES), channel_first=True)
    np.testing.assert_allclose(ours, np.asarray(theirs, dtype=float), rtol=1e-6)
    assert np.ptp(ours) > 0.1
