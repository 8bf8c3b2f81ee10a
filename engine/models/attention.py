"""Patch-weight math of Loss-Attention (TIP 2021 Eqs. 5, 6), as pure tensor functions.

These functions have no parameters: the weights come from the logits that the *shared* classifier
gives each patch. Metrics and the app call them to re-threshold a trained model at any ξ
from cached patch logits, without re-running the backbone.

Numerical decisions (METHOD.md "Project decisions"): norms are exactly 0 for a zero vector and have
a finite gradient there; every denominator is clamped away from 0; if thresholding removes every
patch of an image, the arg-max patch is kept with weight 1. Weights are never NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.models.geometry import PatchGrid

_TINY = 1e-30  # clamp for squared norms and denominators; far below any real value in fp32


def safe_norm(x: torch.Tensor, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
    """L2 norm that is exactly 0 at the zero vector with a zero (not NaN) gradient there."""
    sq = x.pow(2).sum(dim)
    return torch.where(sq > 0, sq.clamp_min(_TINY).sqrt(), torch.zeros_like(sq))


def threshold(xi: float, denominator: str, grid: PatchGrid) -> float:
    """θ: ``ξ/M`` for ``"patches"`` (paper), ``ξ/(H·W)`` of the pre-patch map for
    ``"feature_map"`` (released conv code)."""
    if not 0.0 <= xi <= 1.0:
        raise ValueError(f"xi must be in [0, 1]; got {xi!r}")
    if denominator == "patches":
        return xi / grid.num_patches
    if denominator == "feature_map":
        return xi / grid.feature_cells
    raise ValueError(f"xi_denominator must be 'patches' or 'feature_map'; got {denominator!r}")


def _normalise(x: torch.Tensor, dims: int | tuple[int, ...]) -> torch.Tensor:
    return x / x.sum(dims, keepdim=True).clamp_min(_TINY)


def threshold_groups(scores: torch.Tensor, theta: float | torch.Tensor,
                     total: Callable[[torch.Tensor], torch.Tensor],
                     top: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The TIP threshold for any grouping of scores (the patches of an image, the instances of
    a MIL bag): ReLU(score - θ); where a group keeps nothing, its top score is kept at 1; then
    renormalised to sum 1 per group. ``total(x)`` gives every element its group's sum of ``x``
    and ``top(scores)`` marks each group's top element."""
    kept = F.relu(scores - theta)
    kept = torch.where(total(kept) <= 0, top(scores).to(kept.dtype), kept)
    return kept / total(kept).clamp_min(_TINY)


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(1, keepdim=True)


def _row_argmax(scores: torch.Tensor) -> torch.Tensor:
    return F.one_hot(scores.argmax(1), scores.shape[1])


def threshold_weights(scores: torch.Tensor, theta: float) -> torch.Tensor:
    """Scores (B, M) summing to 1 per row -> ReLU(score - θ), guarded, renormalised to sum 1."""
    return threshold_groups(scores, theta, _row_sum, _row_argmax)


def loss_attention_scores(patch_logits: torch.Tensor) -> torch.Tensor:
    """â (B, M): each patch's share of the logit norms, ||O_m|| / Σ_j ||O_j|| (ℓ2,1)."""
    return _normalise(safe_norm(patch_logits), 1)


def loss_attention_weights(patch_logits: torch.Tensor, theta: float) -> torch.Tensor:
    """Eq. 5: α (B, M) from patch logits (B, M, K): the shares â, thresholded at θ."""
    return threshold_weights(loss_attention_scores(patch_logits), theta)


def capsule_attention(capsule_logits: torch.Tensor, theta: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 for capsules: logits (B, R, M, K) of R capsule channels at M patches.

    Returns the capsule weights α (B, R, M), which pool the capsules, and the patch weights β
    (B, M), which the patch loss and the evaluation use. A patch removed by the threshold gives
    all its capsules weight 0; the kept capsules are renormalised over all (r, m).
    """
    a = _normalise(safe_norm(capsule_logits), (1, 2))
    beta = threshold_weights(a.sum(1), theta)
    kept = (beta > 0).to(a.dtype).unsqueeze(1)  # sgn(β): no gradient, as in the paper
    masked = a * kept
    # If every kept capsule has a zero norm, pool the kept patches' capsules uniformly instead.
    masked = torch.where(masked.sum((1, 2), keepdim=True) > 0, masked, kept.expand_as(a))
    return _normalise(masked, (1, 2)), beta
