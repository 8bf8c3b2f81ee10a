"""Known-answer tests of Eqs. 9 and 10 and of the ramp-up."""

import math

import pytest
import torch

from engine.config import LossConfig
from engine.losses import (
    Criterion,
    multi_label_loss,
    ramp_weight,
    scaled_ramp_epochs,
    single_label_loss,
)
from engine.models import PatchOutput

LN2, LN3 = math.log(2.0), math.log(3.0)


@pytest.mark.parametrize("epoch, expected", [
    (0, 0.0),
    (1, 0.1 * math.exp(-5 * (79 / 80) ** 2)),   # 7.63e-4
    (40, 0.1 * math.exp(-1.25)),                # 0.028650
    (80, 0.1),
    (100, 0.1),
])
def test_ramp_weight(epoch, expected):
    assert ramp_weight(epoch, 0.1, 80) == pytest.approx(expected, rel=1e-12)


def test_ramp_weight_values_written_out():
    assert ramp_weight(40) == pytest.approx(0.0286505, abs=1e-7)
    assert ramp_weight(1) == pytest.approx(0.000763, abs=1e-6)
    assert ramp_weight(5, gamma_max=0.5, ramp_epochs=0) == 0.5
    assert scaled_ramp_epochs(200) == 80 and scaled_ramp_epochs(10) == 4
    with pytest.raises(ValueError, match="epoch"):
        ramp_weight(-1)


def test_single_label_loss_known_answer():
    logits = torch.zeros(2, 2)                   # CE = ln 2 for both images
    patch_logits = torch.tensor([
        [[0.0, 0.0], [LN3, 0.0]],                # y = 0: CE ln 2 and ln(4/3)
        [[0.0, LN3], [0.0, 0.0]],                # y = 1: CE ln(4/3) and ln 2
    ])
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    target = torch.tensor([0, 1])
    terms = single_label_loss(logits, patch_logits, weights, target, weight=0.1)
    patch = (0.25 * LN2 + 0.75 * math.log(4 / 3) + math.log(4 / 3)) / 2
    assert terms.image.item() == pytest.approx(LN2, rel=1e-6)
    assert terms.patch.item() == pytest.approx(patch, rel=1e-6)
    assert terms.total.item() == pytest.approx(LN2 + 0.1 * patch, rel=1e-6)


def test_multi_label_loss_known_answer():
    logits = torch.zeros(2, 3)                   # BCE ln 2 per class: (2 * 3 ln 2) / 2
    patch_logits = torch.tensor([
        [[0.0, 5.0, -LN3], [-LN3, 0.0, LN3]],    # labels {0, 2}: min(ln2, ln4), min(ln4, ln 4/3)
        [[9.0, 9.0, 9.0], [-9.0, -9.0, -9.0]],   # no label: contributes 0
    ], requires_grad=True)
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    target = torch.tensor([[1, 0, 1], [0, 0, 0]])
    terms = multi_label_loss(logits, patch_logits, weights, target, weight=2.0)
    patch = (0.25 * LN2 + 0.75 * math.log(4 / 3)) / 2
    assert terms.image.item() == pytest.approx(3 * LN2, rel=1e-6)
    assert terms.patch.item() == pytest.approx(patch, rel=1e-6)
    assert terms.total.item() == pytest.approx(3 * LN2 + 2 * patch, rel=1e-6)
    terms.total.backward()
    assert torch.isfinite(patch_logits.grad).all()
    assert patch_logits.grad[1].abs().sum() == 0  # the label-less image gets no patch gradient


def test_multi_label_sigmoid_clamp():
    # sigma(-100) is clamped to 1e-6, so the patch NLL is ln(1e6), not 100.
    terms = multi_label_loss(torch.zeros(1, 1), torch.full((1, 1, 1), -100.0),
                             torch.ones(1, 1), torch.ones(1, 1), weight=1.0)
    assert terms.patch.item() == pytest.approx(math.log(1e6), rel=1e-5)


def test_loss_without_patch_outputs_is_image_loss():
    logits = torch.tensor([[2.0, 0.0]])
    terms = single_label_loss(logits, None, None, torch.tensor([0]), weight=1.0)
    assert terms.total.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    assert terms.patch.item() == 0.0


def _output():
    logits = torch.zeros(1, 2)
    patch_logits = torch.tensor([[[0.0, 0.0]]])
    return PatchOutput(logits, patch_logits, torch.ones(1, 1), None)


def test_criterion_applies_ramp_only_to_regularised_heads():
    target = torch.tensor([1])
    la = Criterion(LossConfig(gamma_max=0.1, ramp_epochs=80), regularised=True)
    baseline = Criterion(LossConfig(gamma_max=0.1, ramp_epochs=80), regularised=False)
    assert la(_output(), target, 0).total.item() == pytest.approx(LN2)
    assert la(_output(), target, 100).total.item() == pytest.approx(LN2 * 1.1)
    assert baseline(_output(), target, 100).total.item() == pytest.approx(LN2)
    assert baseline.patch_weight(100) == 0.0


def test_ramp_by_step_moves_within_an_epoch_and_by_epoch_does_not():
    """The paper ramps once per epoch (epoch 0: no patch loss at all, so a one-epoch run would
    never use it); ``ramp_by="step"`` puts the same curve at the fractional epoch."""
    by_epoch = Criterion(LossConfig(gamma_max=0.1, ramp_epochs=1), regularised=True)
    by_step = Criterion(LossConfig(gamma_max=0.1, ramp_epochs=1, ramp_by="step"),
                        regularised=True)
    assert [by_epoch.patch_weight(t) for t in (0.0, 0.5, 0.99, 1.0)] == [0.0, 0.0, 0.0, 0.1]
    # 0.1·exp(-5(1 - 0.5)²) = 0.1·e^-1.25, by hand; 0 at the very first step, as by epoch.
    assert by_step.patch_weight(0.0) == 0.0
    assert by_step.patch_weight(0.5) == pytest.approx(0.1 * math.exp(-1.25), rel=1e-12)
    assert by_step.patch_weight(1.5) == 0.1
    with pytest.raises(ValueError, match="loss.ramp_by"):
        LossConfig(ramp_by="minute")
