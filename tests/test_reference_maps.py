"""Reference maps and the named masks of the faithfulness metrics: known answers on hand-built
scorers and tensors, the error cases, and the shipped model end to end."""

import types
from pathlib import Path

import pytest
import torch

from engine import explain
from engine.checkpoint import load_model
from engine.config import DataConfig
from engine.data import load_split
from engine.explain import (
    MASKS,
    REFERENCES,
    average_drop_increase,
    deletion_insertion_curves,
    faithfulness,
    mask_fill,
    masked_images,
    reference_maps,
)

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_small_cnn_la.pt"
CPU = torch.device("cpu")
MEAN = (0.2, 0.4, 0.6)


class MeanScorer:
    """Score = the image's mean pixel value: a hand-checkable stand-in for a model."""

    data = types.SimpleNamespace(mean=MEAN)

    def __call__(self, pixels, classes):
        return pixels.flatten(1).mean(1)


def _pixels(seed=0, b=2, side=8):
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def test_masks_known_answers():
    pixels = _pixels()
    zero, one = torch.zeros(2, 8, 8), torch.ones(2, 8, 8)
    # black: the image times the map
    half = torch.full((2, 8, 8), 0.5)
    assert torch.equal(masked_images(pixels, half, mask_fill(pixels, "black")), pixels * 0.5)
    # mean: a map of 0 leaves the data set's mean colour everywhere
    mean_image = masked_images(pixels, zero, mask_fill(pixels, "mean", MEAN))
    assert torch.allclose(mean_image, torch.tensor(MEAN).view(1, 3, 1, 1).expand(2, 3, 8, 8))
    # blur: a map of 1 is the image; a map of 0 is its blurred copy
    blur = mask_fill(pixels, "blur")
    assert torch.equal(masked_images(pixels, one, blur), pixels)
    assert torch.allclose(masked_images(pixels, zero, blur), explain._blur(pixels))
    assert not torch.allclose(blur, pixels)


def test_average_drop_under_each_mask():
    scorer, pixels, classes = MeanScorer(), _pixels(), torch.zeros(2, dtype=torch.long)
    y = scorer(pixels, classes)
    # the uniform map keeps everything: no drop and no increase under any mask
    for mask in MASKS:
        drop, inc = average_drop_increase(scorer, pixels, torch.ones(2, 8, 8), classes,
                                          mask=mask)
        assert torch.allclose(drop, torch.zeros(2), atol=1e-6) and inc.sum() == 0
    # a map of 0 under black: the score falls to 0, a drop of 100 %
    drop, _ = average_drop_increase(scorer, pixels, torch.zeros(2, 8, 8), classes)
    assert torch.allclose(drop, torch.ones(2))
    # under mean: the score becomes the mean colour's, 0.4
    drop, inc = average_drop_increase(scorer, pixels, torch.zeros(2, 8, 8), classes, mask="mean")
    assert torch.allclose(drop, (y - 0.4).clamp_min(0) / y)
    assert torch.equal(inc, (torch.tensor(0.4) > y).float())


def test_deletion_fill_follows_the_mask_and_insertion_starts_blurred():
    scorer, pixels, classes = MeanScorer(), _pixels(), torch.zeros(2, dtype=torch.long)
    maps = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    deleted, inserted = deletion_insertion_curves(scorer, pixels, maps, classes, 4)
    assert torch.allclose(deleted[:, -1], torch.zeros(2))  # everything black
    fill = mask_fill(pixels, "mean", MEAN)
    deleted, inserted_mean = deletion_insertion_curves(scorer, pixels, maps, classes, 4, fill)
    assert torch.allclose(deleted[:, -1], torch.full((2,), 0.4))  # everything mean colour
    assert torch.allclose(deleted[:, 0], scorer(pixels, classes))
    assert torch.equal(inserted, inserted_mean)  # insertion ignores the mask
    assert torch.allclose(inserted[:, 0], scorer(explain._blur(pixels), classes))


def test_reference_maps_known_answers():
    pixels = _pixels(side=9)
    assert torch.equal(reference_maps("uniform", pixels), torch.ones(2, 9, 9))
    centre = reference_maps("centre", pixels)
    assert centre[0, 4, 4] == 1 and centre.min() == 0  # peak at the centre, min-max scaled
    assert torch.allclose(centre, centre.flip(1)) and torch.allclose(centre, centre.transpose(1, 2))
    assert centre[0, 4, 4 + 2] > centre[0, 4, 4 + 3]  # falls off with distance
    grey = pixels.mean(1)
    intensity = reference_maps("intensity", pixels)
    assert intensity.amin((1, 2)).tolist() == [0, 0] and intensity.amax((1, 2)).tolist() == [1, 1]
    assert torch.equal(intensity.flatten(1).argmax(1), grey.flatten(1).argmax(1))
    a = reference_maps("random", pixels, torch.Generator().manual_seed(5))
    b = reference_maps("random", pixels, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and 0 <= a.min() and a.max() <= 1 and a.std() > 0.2
    assert not torch.equal(a[0], a[1])  # a fresh draw per image


def test_bad_names_and_draws_are_clear_errors():
    with pytest.raises(ValueError, match=r"mask must be one of \['black', 'mean', 'blur'\]; "
                                         r"got 'white'"):
        explain.check_mask("white")
    with pytest.raises(ValueError, match="mask must be one of"):
        mask_fill(_pixels(), "white")
    with pytest.raises(ValueError, match="reference map must be one of"):
        reference_maps("edges", _pixels())
    for draws in (0, -1):
        with pytest.raises(ValueError, match="draws >= 1"):
            explain.check_references(["random"], draws)
    with pytest.raises(ValueError, match="reference maps must be among"):
        explain.check_references(["edges"], 8)


@pytest.fixture(scope="module")
def shipped():
    model, ckpt = load_model(SHIPPED)
    data = load_split(DataConfig(**{**ckpt["run_config"]["data"], "test_size": 64}), "test")
    return model, data


def test_faithfulness_reports_references_and_mask(shipped):
    model, data = shipped
    indices = torch.arange(6)
    with pytest.raises(ValueError, match="mask must be one of"):
        faithfulness(model, data, CPU, indices, ["gradcam"], steps=2, mask="white")
    with pytest.raises(ValueError, match="draws >= 1"):
        faithfulness(model, data, CPU, indices, ["gradcam"], steps=2, references=["random"],
                     draws=0)
    report = faithfulness(model, data, CPU, indices, ["gradcam"], steps=2,
                          references=list(REFERENCES), draws=2, mask="black")
    assert report["mask"] == "black" and report["random_draws"] == 2
    assert set(report["references"]) == set(REFERENCES) and set(report["methods"]) == {"gradcam"}
    uniform = report["references"]["uniform"]
    assert uniform["average_drop_pct"] == 0 and uniform["increase_in_confidence_pct"] == 0
    assert set(report["curves"]) == {"gradcam", *REFERENCES}
    # the seeded random reference is reproducible; another seed draws other maps
    again = faithfulness(model, data, CPU, indices, [], steps=2, references=["random"], draws=2)
    assert again["references"]["random"] == report["references"]["random"]
    other = faithfulness(model, data, CPU, indices, [], steps=2, references=["random"], draws=2,
                         seed=1)
    assert other["references"]["random"] != report["references"]["random"]
    blur = faithfulness(model, data, CPU, indices, [], steps=2, references=["uniform"],
                        mask="blur")
    assert blur["mask"] == "blur" and blur["references"]["uniform"]["average_drop_pct"] == 0


def test_a_set_without_boxes_skips_only_the_pointing_games(shipped):
    import dataclasses

    model, data = shipped
    plain = dataclasses.replace(data, box_data=None, box_offsets=None)
    report = faithfulness(model, plain, CPU, torch.arange(4), ["gradcam"], steps=2,
                          references=["centre"])
    for row in (report["methods"]["gradcam"], report["references"]["centre"]):
        assert "pointing_game" not in row and "energy_pointing_game" not in row
        assert "average_drop_pct" in row and "insertion_auc" in row
    assert "no bounding boxes" in report["skipped"] and "pointing game" in report["skipped"]
