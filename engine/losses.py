"""Loss-Attention objectives (TIP Eqs. 9 and 10) and the Gaussian ramp-up of the patch term.

Reductions follow the released code (METHOD.md §3, D6):
- single-label: mean image CE + w(τ) · (1/B) Σ_i Σ_m α_im CE(O_im, y_i);
- multi-label: (1/B) Σ_i Σ_k BCE(z_ik, y_ik) + w(τ) · (1/B) Σ_i Σ_m α_im min_{k∈Y_i} −log σ(O_imk),
  σ clamped to [1e-6, 1 − 1e-6], no negative-label term, an image with no label adds 0.
Capsule heads already return the channel-summed patch logits and the patch weights β, so the same
functions serve them. Losses are computed in fp32 whatever the autocast state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from engine.config import LossConfig

PAPER_EPOCHS, PAPER_RAMP = 200, 80


def ramp_weight(epoch: float, gamma_max: float = 0.1, ramp_epochs: int = PAPER_RAMP) -> float:
    """w(τ) for 0-based epoch τ: 0 at τ = 0, γmax·exp(−5(1 − τ/R)²) for τ < R, γmax after.
    τ may be fractional (a ramp by step, ``LossConfig.ramp_by``)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0; got {epoch}")
    if epoch == 0:
        return 0.0
    if epoch >= ramp_epochs:
        return float(gamma_max)
    return float(gamma_max) * math.exp(-5.0 * (1.0 - epoch / ramp_epochs) ** 2)


def scaled_ramp_epochs(epochs: int) -> int:
    """Ramp length for a run of ``epochs`` epochs, keeping the paper's 80/200 proportion."""
    return max(1, round(epochs * PAPER_RAMP / PAPER_EPOCHS))


def patch_loss_share(gamma_max: float, ramp_epochs: int, ramp_by: str, epochs: int,
                     samples_per_epoch: int = 64) -> float:
    """The patch-loss weight w averaged over a run of ``epochs`` epochs, as a share of γmax:
    0 means the patch loss never acts (a 1-epoch run ramped by epoch has w = 0 throughout), so
    γmax cannot change what the run learns; 1 means full weight from the start."""
    if gamma_max == 0 or epochs < 1:
        return 0.0
    if ramp_by == "step":  # the fractional position, sampled along the run
        positions = [(i + 0.5) / samples_per_epoch for i in range(epochs * samples_per_epoch)]
    else:
        positions = list(range(epochs))
    return sum(ramp_weight(t, 1.0, ramp_epochs) for t in positions) / len(positions)


class LossTerms(NamedTuple):
    total: torch.Tensor
    image: torch.Tensor
    patch: torch.Tensor
    """The unweighted patch term (before multiplying by w(τ)); 0 when it does not apply."""


def patch_cross_entropy(patch_logits: torch.Tensor, patch_weights: torch.Tensor,
                        target: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_i Σ_m α_im CE(O_im, y_i): every patch is given its image's label."""
    b, m, k = patch_logits.shape
    ce = F.cross_entropy(patch_logits.reshape(b * m, k).float(),
                         target.repeat_interleave(m), reduction="none").view(b, m)
    return (patch_weights.float() * ce).sum() / b


def patch_min_positive_nll(patch_logits: torch.Tensor, patch_weights: torch.Tensor,
                           target: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_i Σ_m α_im min_{k∈Y_i} −log σ(O_imk): a patch only needs to share one label."""
    b = patch_logits.shape[0]
    nll = -torch.sigmoid(patch_logits.float()).clamp(1e-6, 1.0 - 1e-6).log()  # (B, M, K)
    positive = (target > 0).unsqueeze(1)  # (B, 1, K)
    best = torch.where(positive, nll, torch.full_like(nll, math.inf)).amin(-1)  # (B, M)
    has_label = positive.any(-1)  # (B, 1)
    best = torch.where(has_label, best, torch.zeros_like(best))
    return (patch_weights.float() * best).sum() / b


def single_label_loss(logits: torch.Tensor, patch_logits: torch.Tensor | None,
                      patch_weights: torch.Tensor | None, target: torch.Tensor,
                      weight: float) -> LossTerms:
    """Eq. 9. ``weight`` is w(τ); with no patch outputs or weight 0 only the image CE remains."""
    image = F.cross_entropy(logits.float(), target)
    if patch_logits is None or patch_weights is None:
        return LossTerms(image, image, image.new_zeros(()))
    patch = patch_cross_entropy(patch_logits, patch_weights, target)
    return LossTerms(image + weight * patch, image, patch)


def multi_label_loss(logits: torch.Tensor, patch_logits: torch.Tensor | None,
                     patch_weights: torch.Tensor | None, target: torch.Tensor,
                     weight: float) -> LossTerms:
    """Eq. 10 with a multi-hot ``target`` (B, K)."""
    target = target.float()
    image = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum")
    image = image / logits.shape[0]
    if patch_logits is None or patch_weights is None:
        return LossTerms(image, image, image.new_zeros(()))
    patch = patch_min_positive_nll(patch_logits, patch_weights, target)
    return LossTerms(image + weight * patch, image, patch)


class Criterion:
    """The training objective for one model: Eq. 9 or 10, with the patch term only for
    regularised (Loss-Attention) heads, weighted by the ramp-up at the current epoch."""

    def __init__(self, config: LossConfig, regularised: bool) -> None:
        self.config = config
        self.regularised = regularised

    def patch_weight(self, t: float) -> float:
        """w(τ) at position ``t`` (epochs): the paper ramps by whole epochs (τ = floor(t)),
        ``ramp_by="step"`` by the fractional position itself."""
        if not self.regularised:
            return 0.0
        ramp = PAPER_RAMP if self.config.ramp_epochs is None else self.config.ramp_epochs
        tau = t if self.config.ramp_by == "step" else math.floor(t)
        return ramp_weight(tau, self.config.gamma_max, ramp)

    def __call__(self, output, target: torch.Tensor, t: float) -> LossTerms:
        """``output`` is a :class:`engine.models.PatchOutput`; ``t`` the position in epochs."""
        fn = multi_label_loss if self.config.multilabel else single_label_loss
        if not self.regularised:
            return fn(output.logits, None, None, target, 0.0)
        return fn(output.logits, output.patch_logits, output.patch_weights, target,
                  self.patch_weight(t))
