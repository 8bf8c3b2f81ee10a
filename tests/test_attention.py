"""Known-answer tests of the patch-weight math (TIP Eqs. 5, 6) and its guards."""

import math

import pytest
import torch

from engine.config import ModelConfig
from engine.models import build_model, capsule_attention, loss_attention_weights, threshold
from engine.models.geometry import PatchGrid

# Four patches, two classes. Row norms 5, 0, 10, 5 -> l2,1-normalised 0.25, 0, 0.5, 0.25.
LOGITS = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [6.0, 8.0], [0.0, 5.0]]])


def grid(rows=2, cols=2, feature=(8, 8)):
    return PatchGrid(rows, cols, (32, 32), feature, torch.zeros(rows * cols, 4, dtype=torch.long))


def test_threshold_denominators():
    g = grid(feature=(10, 10))
    assert threshold(0.4, "patches", g) == pytest.approx(0.1)
    assert threshold(0.4, "feature_map", g) == pytest.approx(0.004)
    with pytest.raises(ValueError, match="xi"):
        threshold(1.5, "patches", g)
    with pytest.raises(ValueError, match="xi_denominator"):
        threshold(0.1, "pixels", g)


@pytest.mark.parametrize("theta, expected", [
    (0.0, [0.25, 0.0, 0.5, 0.25]),            # xi = 0: every non-zero-norm patch, its norm share
    (0.1, [3 / 14, 0.0, 8 / 14, 3 / 14]),     # t = [.15, 0, .4, .15] / .7
    (0.25, [0.0, 0.0, 1.0, 0.0]),             # xi = 1 with M = 4: only the above-average patch
    (0.004, [0.246 / 0.988, 0.0, 0.496 / 0.988, 0.246 / 0.988]),  # "feature_map" theta, 0.4/100
])
def test_loss_attention_weights_known_answers(theta, expected):
    weights = loss_attention_weights(LOGITS, theta)
    torch.testing.assert_close(weights, torch.tensor([expected]), atol=1e-7, rtol=0)


def test_guard_keeps_argmax_when_threshold_removes_everything():
    # Equal norms: every normalised weight is exactly 1/M, so xi = 1 ("patches") removes all.
    logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    weights = loss_attention_weights(logits, 1.0 / 3)
    assert weights.sum().item() == pytest.approx(1.0)
    assert (weights > 0).sum().item() == 1


def test_all_zero_logits_give_one_patch_not_nan():
    logits = torch.zeros(2, 5, 3, requires_grad=True)
    weights = loss_attention_weights(logits, 0.0)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    weights[:, 0].sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_weights_carry_gradient_to_logits():
    logits = LOGITS.clone().requires_grad_(True)
    (loss_attention_weights(logits, 0.1) * torch.arange(4.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("denominator", ["patches", "feature_map"])
def test_weights_valid_for_every_xi(denominator):
    logits = torch.randn(16, 36, 10) * torch.rand(16, 36, 1) ** 3  # skewed norms
    logits[0] = 0.0   # a blank image
    logits[1, :5] = 0.0  # zero-norm patches
    logits[2] = torch.tensor([1.0] + [0.0] * 9)  # all patches identical: ties at 1/M
    g = grid(6, 6, (32, 32))
    for xi in torch.linspace(0, 1, 21).tolist():
        weights = loss_attention_weights(logits, threshold(xi, denominator, g))
        assert torch.isfinite(weights).all(), xi
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(1), torch.ones(16), atol=1e-6, rtol=0)


def test_xi_zero_keeps_exactly_the_nonzero_norm_patches():
    logits = torch.randn(4, 36, 10)
    logits[:, ::3] = 0.0
    weights = loss_attention_weights(logits, 0.0)
    assert torch.equal(weights > 0, logits.norm(dim=-1) > 0)


def test_xi_one_patches_keeps_only_above_average():
    logits = torch.randn(8, 36, 10)
    share = logits.norm(dim=-1) / logits.norm(dim=-1).sum(1, keepdim=True)
    weights = loss_attention_weights(logits, 1.0 / 36)
    assert torch.equal(weights > 0, share > 1.0 / 36)


def test_capsule_attention_known_answers():
    # R = 2 channels, M = 3 patches, K = 1: norms are |value|, total 8.
    logits = torch.tensor([[[1.0, 2.0, 0.0], [1.0, 0.0, 4.0]]]).unsqueeze(-1)
    alpha, beta = capsule_attention(logits, 0.6 / 3)  # s = [.25, .25, .5] -> t = [.05, .05, .3]
    torch.testing.assert_close(beta, torch.tensor([[1 / 8, 1 / 8, 6 / 8]]))
    torch.testing.assert_close(alpha, torch.tensor([[[1.0, 2.0, 0.0], [1.0, 0.0, 4.0]]]) / 8)
    alpha, beta = capsule_attention(logits, 0.9 / 3)  # only patch 2 survives
    torch.testing.assert_close(beta, torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(alpha, torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]))


def test_capsule_attention_never_nan():
    alpha, beta = capsule_attention(torch.zeros(3, 4, 9, 5), 1.0 / 9)
    assert torch.isfinite(alpha).all() and torch.isfinite(beta).all()
    torch.testing.assert_close(beta.sum(1), torch.ones(3))
    torch.testing.assert_close(alpha.sum((1, 2)), torch.ones(3))


def _hand_built_head():
    """A Loss-Attention head with C = 2 patch channels and a hand-set classifier."""
    model = build_model(ModelConfig(backbone="small_cnn", head="loss_attention", num_classes=3,
                                    patch_channels=2, xi=0.0))
    with torch.no_grad():
        model.head.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model.head.fc.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    return model


def test_head_image_logit_is_weighted_sum_of_patch_logits_known_answer():
    model = _hand_built_head()
    # Patch logits: [1,0,0] (norm 1), [0,2,1] (norm sqrt 5), [1,1,1] (norm sqrt 3).
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    out = model.head.decode(tokens, theta=0.0)
    norms = torch.tensor([1.0, math.sqrt(5), math.sqrt(3)])
    torch.testing.assert_close(out.patch_weights, (norms / norms.sum()).unsqueeze(0))
    torch.testing.assert_close(out.patch_logits,
                               torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0]]]))
    expected = (out.patch_weights.unsqueeze(-1) * out.patch_logits).sum(1)
    torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("head", ["loss_attention", "mean", "attention", "gated_attention",
                                  "capsule_loss_attention"])
def test_model_image_logit_equals_weighted_patch_logits(head):
    model = build_model(ModelConfig(backbone="small_cnn", head=head)).eval()
    out = model(torch.randn(3, 3, 32, 32))
    weighted = (out.patch_weights.unsqueeze(-1) * out.patch_logits).sum(1)
    if head == "capsule_loss_attention":
        # Capsule patch logits are channel sums (bias counted R times): z is the α-weighted sum
        # of capsule logits instead, checked through the decode pieces.
        tokens = model.encode(torch.randn(2, 3, 32, 32))
        caps = torch.nn.functional.linear(tokens, model.head.fc.weight, model.head.fc.bias)
        alpha, _ = capsule_attention(caps, model.theta(out.grid))
        direct = model.head.decode(tokens, model.theta(out.grid)).logits
        torch.testing.assert_close(direct, (alpha.unsqueeze(-1) * caps).sum((1, 2)),
                                   atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(out.logits, weighted, atol=1e-6, rtol=0)
