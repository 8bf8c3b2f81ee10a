"""Heads: the patch layer, the pooling (attention) and the shared classifier.

A head turns the backbone map into *tokens* (``encode``) and the tokens into image logits, patch
logits and patch weights (``decode``). Splitting the two lets the app cache tokens and re-decode at
another ξ cheaply. ``decode`` runs in fp32 even under autocast: the threshold compares weights near
1/M, where bf16's three significant digits would change which patches survive.

Class attributes say how the rest of the engine treats a head:
``regularised``: the patch-loss term of Eqs. 9/10 applies (Loss-Attention heads only, METHOD.md);
``selection``: which patches count as selected, ``"positive"`` (weight > 0),
``"above_uniform"`` (weight > 1/M, the attention baselines) or ``"all"`` (Mean-pooling).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.models.attention import (
    capsule_attention,
    loss_attention_scores,
    loss_attention_weights,
    safe_norm,
    threshold_weights,
)
from engine.models.geometry import LayerGeom
from engine.models.registry import register_head


class HeadOutput(NamedTuple):
    logits: torch.Tensor
    patch_logits: torch.Tensor | None
    patch_weights: torch.Tensor | None


def _fp32(device: torch.device):
    """Disable autocast for the attention math (see module docstring)."""
    return torch.autocast(device_type=device.type, enabled=False)


class Head(nn.Module):
    regularised = False
    selection = "above_uniform"
    has_patches = True
    xi_dependent = False
    """Whether ξ changes the outputs (Loss-Attention heads)."""
    fc: nn.Linear

    def patch_geom(self) -> LayerGeom | None:
        raise NotImplementedError

    def encode(self, fmap: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor, theta: float) -> HeadOutput:
        raise NotImplementedError

    def xi_cache(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The few tensors from which :meth:`decode_cached` rebuilds the outputs at any θ.

        Much smaller than the tokens (per image M x K numbers instead of M x C), so an evaluation
        can keep them for a whole data set and sweep ξ without the backbone."""
        out = self.decode(tokens, 0.0)
        return {k: v for k, v in out._asdict().items() if v is not None}

    def decode_cached(self, cache: dict[str, torch.Tensor], theta: float) -> HeadOutput:
        return HeadOutput(cache["logits"], cache.get("patch_logits"), cache.get("patch_weights"))

    def selection_scores(self, cache: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, M) scores that θ cuts (the Loss-Attention heads), from :meth:`xi_cache`'s
        tensors; None for a head whose weights do not depend on ξ."""
        return None


class ConvPatchLayer(nn.Module):
    """The paper's added layers: k x k / stride s conv (no bias) + BN + ReLU, then 1x1 + BN + ReLU.

    Output tokens are (B, M, C) with patch index m = i * cols + j (row-major).
    """

    def __init__(self, cin: int, channels: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv5 = nn.Conv2d(cin, channels, kernel, stride=stride, padding=padding, bias=False)
        self.bn5 = nn.BatchNorm2d(channels)
        self.conv6 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn6 = nn.BatchNorm2d(channels)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn5(self.conv5(fmap)))
        x = F.relu(self.bn6(self.conv6(x)))
        return x.flatten(2).transpose(1, 2)


class PoolingHead(Head):
    """Conv patch layer, then z = W (Σ_m α_m h_m) + b with α from :meth:`weights`.

    Patch logits are W h_m + b with the same W, b, so each patch gets a prediction from the image
    classifier; because Σ α = 1, z equals Σ_m α_m (W h_m + b).
    """

    def __init__(self, cfg: ModelConfig, cin: int) -> None:
        super().__init__()
        self.patches = ConvPatchLayer(cin, cfg.patch_channels, cfg.patch_kernel,
                                      cfg.patch_stride, cfg.patch_padding)
        self.fc = nn.Linear(cfg.patch_channels, cfg.num_classes)

    def patch_geom(self) -> LayerGeom:
        return LayerGeom.of(self.patches.conv5)

    def encode(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.patches(fmap)

    def weights(self, tokens: torch.Tensor, patch_logits: torch.Tensor, theta: float
                ) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor, theta: float) -> HeadOutput:
        with _fp32(tokens.device):
            tokens = tokens.float()
            patch_logits = F.linear(tokens, self.fc.weight.float(), self.fc.bias.float())
            alpha = self.weights(tokens, patch_logits, theta)
            pooled = torch.bmm(alpha.unsqueeze(1), tokens).squeeze(1)
            logits = F.linear(pooled, self.fc.weight.float(), self.fc.bias.float())
        return HeadOutput(logits, patch_logits, alpha)


@register_head("loss_attention", label="Loss-Attention (conv)",
               description="Loss-Attention, conv patches (TIP Eq. 5)",
               released_xi_denominator="feature_map")
class LossAttentionHead(PoolingHead):
    """TIP Eq. 5: weights from the ℓ2,1-normalised norms of the patch logits, thresholded by θ.
    No parameters of its own beyond the shared classifier."""

    regularised = True
    selection = "positive"
    xi_dependent = True

    def weights(self, tokens, patch_logits, theta):
        return loss_attention_weights(patch_logits, theta)

    def xi_cache(self, tokens):
        with _fp32(tokens.device):
            return {"patch_logits": F.linear(tokens.float(), self.fc.weight.float(),
                                             self.fc.bias.float())}

    def decode_cached(self, cache, theta):
        patch_logits = cache["patch_logits"]
        alpha = loss_attention_weights(patch_logits, theta)
        # Σ α = 1, so W(Σ α h) + b = Σ α (W h + b): the image logit from the patch logits alone.
        return HeadOutput(torch.einsum("bm,bmk->bk", alpha, patch_logits), patch_logits, alpha)

    def selection_scores(self, cache):
        return loss_attention_scores(cache["patch_logits"])


@register_head("mean", label="Mean pooling", recipe="adam",
               description="Mean-pooling of patches (baseline)")
class MeanPoolingHead(PoolingHead):
    """Baseline: α_m = 1/M.

    Every patch enters the decision with the same weight, so every patch counts as selected:
    the baselines' "> 1/M" rule would select none and leave patch precision undefined."""

    selection = "all"

    def weights(self, tokens, patch_logits, theta):
        return tokens.new_full(tokens.shape[:2], 1.0 / tokens.shape[1])


@register_head("attention", label="Attention (Ilse)",
               description="Attention pooling, Ilse et al. 2018 (baseline)")
class AttentionHead(PoolingHead):
    """Baseline (Ilse et al. 2018): α = softmax_m(wᵀ tanh(V h_m)), hidden size D."""

    def __init__(self, cfg: ModelConfig, cin: int) -> None:
        super().__init__(cfg, cin)
        self.attention_v = nn.Linear(cfg.patch_channels, cfg.attention_hidden)
        self.attention_w = nn.Linear(cfg.attention_hidden, 1)

    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.attention_v(tokens))

    def weights(self, tokens, patch_logits, theta):
        return torch.softmax(self.attention_w(self.scores(tokens)).squeeze(-1), dim=1)


@register_head("gated_attention", label="Gated attention (Ilse)",
               description="Gated-Attention pooling, Ilse et al. 2018 (baseline)")
class GatedAttentionHead(AttentionHead):
    """Baseline (Ilse et al. 2018): α = softmax_m(wᵀ (tanh(V h_m) ⊙ sigm(U h_m)))."""

    def __init__(self, cfg: ModelConfig, cin: int) -> None:
        super().__init__(cfg, cin)
        self.attention_u = nn.Linear(cfg.patch_channels, cfg.attention_hidden)

    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.attention_v(tokens)) * torch.sigmoid(self.attention_u(tokens))


@register_head("plain", label="Plain backbone", standard_backbone=True,
               description="Global average pooling + linear, no patches (baseline)")
class PlainHead(Head):
    """Baseline: global average pooling of the backbone map, optional MLP, linear classifier.
    No patches: patch logits and weights are ``None``."""

    has_patches = False

    def __init__(self, cfg: ModelConfig, cin: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in cfg.plain_hidden:
            layers += [nn.Linear(cin, width), nn.ReLU(inplace=True), nn.Dropout(0.5)]
            cin = width
        self.mlp = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, cfg.num_classes)

    def patch_geom(self) -> None:
        return None

    def encode(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean((2, 3))

    def decode(self, tokens: torch.Tensor, theta: float) -> HeadOutput:
        return HeadOutput(self.fc(self.mlp(tokens)), None, None)


@register_head("capsule_loss_attention", label="Loss-Attention (capsule)",
               description="Loss-Attention, capsules (TIP Eqs. 6, 11)",
               released_xi_denominator="patches")
class CapsuleLossAttentionHead(Head):
    """TIP Eqs. 6 and 11: capsule Loss-Attention (METHOD.md §2).

    Primary capsules: P channels x D1-D (the D1 independent conv units of the paper are one conv
    with D1·P outputs; unit u channel r is output u·P + r). Their lengths minus a learnable
    per-channel threshold b_r, ReLU'd, feed R channels x D-D second capsules (1x1 conv, again one
    conv for the D units). Tokens are the capsules h_{r,m}, shape (B, R, M, D).

    The released code also defines a 1x1 ``shortcut`` conv in each second-layer unit that forward()
    never uses; it is not built here. The paper's parameter counts include it: see
    :meth:`unused_shortcut_params`.
    """

    regularised = True
    selection = "positive"
    xi_dependent = True

    def __init__(self, cfg: ModelConfig, cin: int) -> None:
        super().__init__()
        p, d1, r, d = cfg.primary_caps, cfg.primary_dim, cfg.caps_channels, cfg.caps_dim
        self.dims = (p, d1, r, d)
        self.primary = nn.Conv2d(cin, d1 * p, cfg.patch_kernel, stride=cfg.patch_stride,
                                 padding=cfg.patch_padding, bias=True)
        self.primary_bn = nn.BatchNorm2d(d1 * p)
        self.length_threshold = nn.Parameter(torch.randn(1, p, 1, 1))
        self.secondary = nn.Conv2d(p, d * r, 1, bias=True)
        self.secondary_bn = nn.BatchNorm2d(d * r)
        self.fc = nn.Linear(d, cfg.num_classes)

    @staticmethod
    def unused_shortcut_params(cfg: ModelConfig) -> int:
        """Parameters of the released code's unused shortcut convs (P->R 1x1 with bias, per
        unit)."""
        return cfg.caps_dim * (cfg.primary_caps * cfg.caps_channels + cfg.caps_channels)

    def patch_geom(self) -> LayerGeom:
        return LayerGeom.of(self.primary)

    def encode(self, fmap: torch.Tensor) -> torch.Tensor:
        p, d1, r, d = self.dims
        u = F.relu(self.primary_bn(self.primary(fmap)))
        b, _, rows, cols = u.shape
        lengths = safe_norm(u.reshape(b, d1, p, rows, cols), dim=1)
        s = F.relu(lengths - self.length_threshold)
        q = F.relu(self.secondary_bn(self.secondary(s)))
        return q.reshape(b, d, r, rows * cols).permute(0, 2, 3, 1)

    def decode(self, tokens: torch.Tensor, theta: float) -> HeadOutput:
        with _fp32(tokens.device):
            tokens = tokens.float()
            w, bias = self.fc.weight.float(), self.fc.bias.float()
            capsule_logits = F.linear(tokens, w, bias)  # (B, R, M, K)
            alpha, beta = capsule_attention(capsule_logits, theta)
            pooled = torch.einsum("brm,brmd->bd", alpha, tokens)
            logits = F.linear(pooled, w, bias)
            # Unweighted channel sum (the bias enters R times), as the released code feeds the loss.
            patch_logits = capsule_logits.sum(1)
        return HeadOutput(logits, patch_logits, beta)

    def xi_cache(self, tokens):
        """Per patch: its capsule share s_m = Σ_r a_rm, the share-weighted logits Σ_r a_rm o_rm
        and the channel-summed logits. Enough for any θ, as
        z = Σ_m kept_m Σ_r a_rm o_rm / Σ_m kept_m s_m."""
        with _fp32(tokens.device):
            caps = F.linear(tokens.float(), self.fc.weight.float(), self.fc.bias.float())
            a = safe_norm(caps)
            a = a / a.sum((1, 2), keepdim=True).clamp_min(1e-30)
            return {"share": a.sum(1), "weighted": torch.einsum("brm,brmk->bmk", a, caps),
                    "patch_logits": caps.sum(1)}

    def decode_cached(self, cache, theta):
        share, weighted, patch_logits = cache["share"], cache["weighted"], cache["patch_logits"]
        beta = threshold_weights(share, theta)
        kept = (beta > 0).to(share.dtype)
        mass = (kept * share).sum(1, keepdim=True)
        logits = torch.einsum("bm,bmk->bk", kept, weighted) / mass.clamp_min(1e-30)
        # All kept capsules with zero norm: capsule_attention pools them uniformly.
        uniform = torch.einsum("bm,bmk->bk", kept, patch_logits) / (
            kept.sum(1, keepdim=True) * self.dims[2])
        return HeadOutput(torch.where(mass > 0, logits, uniform), patch_logits, beta)

    def selection_scores(self, cache):
        """s_m = Σ_r a_rm, each patch's share of the capsule logit norms (Eq. 6)."""
        return cache["share"]


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sabour et al. 2017: v = |s|²/(1+|s|²) · s/|s|, exactly 0 at s = 0."""
    sq = s.pow(2).sum(dim, keepdim=True)
    return s * (sq / (1.0 + sq)) / sq.clamp_min(1e-12).sqrt()


@register_head("dynamic_routing", label="Dynamic routing", recipe="adam",
               description="Capsules with routing-by-agreement, Sabour et al. 2017 (baseline)")
class DynamicRoutingHead(Head):
    """Baseline: routing-by-agreement (Sabour et al. 2017) on the modified capsule architecture.

    The paper gives no details, so these are this project's choices:
    - primary capsules: the same k x k / stride s conv as capsule Loss-Attention, P channels x D1-D
      at each of the M patches, squashed (no BN, no learned threshold);
    - votes û_{k|r,m} = W_{r,k} u_{r,m}: one D1 x D2 matrix per primary channel r and class k,
      shared over patch positions (so the model works for any grid size); D2 = 16;
    - ``routing_iters`` iterations of softmax-over-classes routing, gradients through all of them;
    - image logits = s · |v_k| with a learnable scale s (init 10), so that softmax CE (Eq. 9) can
      train it like the other heads (capsule lengths alone lie in [0, 1));
    - patch logits = s · |squash(Σ_r û_{k|r,m})|: the class capsule a patch alone would produce;
    - patch weights = share of the predicted class's routed vote, |Σ_r c_{r,m,k̂} û_{k̂|r,m}|,
      normalised over patches. Selection (baseline rule): weight > 1/M.

    Parameter count (K = 10, 32x32, computed with this engine): 32,484,929 on resnet18 and
    30,542,081 on vgg11_bn, where the paper's Table II has 35.35M and 33.41M. The difference is
    the shared vote matrices. With one set per primary capsule, i.e. per patch position too, as
    Sabour et al.'s W_ij is per input capsule, the votes would have M·P·K·D1·D2 = 36·32·10·16·16
    = 2,949,120 parameters instead of P·K·D1·D2 = 81,920: 2,867,200 more, giving 35,352,129 and
    33,409,281, the paper's figures to its rounding (:meth:`per_position_vote_params`). The
    capsule head's unused shortcut convs (270,336) play no part: adding them misses by 0.27M.
    Votes stay shared here so that the head works for any grid size.
    """

    class_dim = 16

    def __init__(self, cfg: ModelConfig, cin: int) -> None:
        super().__init__()
        p, d1 = cfg.primary_caps, cfg.primary_dim
        self.dims = (p, d1)
        self.iters = cfg.routing_iters
        self.primary = nn.Conv2d(cin, d1 * p, cfg.patch_kernel, stride=cfg.patch_stride,
                                 padding=cfg.patch_padding, bias=True)
        self.votes = nn.Parameter(torch.randn(p, cfg.num_classes, d1, self.class_dim) * 0.05)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    @classmethod
    def per_position_vote_params(cls, cfg: ModelConfig, num_patches: int) -> int:
        """Vote parameters if every patch position had its own matrices (Sabour et al.'s
        per-input-capsule W_ij), the convention that the paper's Table II counts match."""
        return num_patches * cfg.primary_caps * cfg.num_classes * cfg.primary_dim * cls.class_dim

    def patch_geom(self) -> LayerGeom:
        return LayerGeom.of(self.primary)

    def encode(self, fmap: torch.Tensor) -> torch.Tensor:
        p, d1 = self.dims
        u = self.primary(fmap)
        b, _, rows, cols = u.shape
        return squash(u.reshape(b, d1, p, rows * cols).permute(0, 2, 3, 1))  # (B, P, M, D1)

    def decode(self, tokens: torch.Tensor, theta: float) -> HeadOutput:
        with _fp32(tokens.device):
            u = tokens.float()
            votes = torch.einsum("bpmd,pkde->bpmke", u, self.votes.float())
            route = votes.new_zeros(votes.shape[:4])
            for it in range(self.iters):
                coupling = torch.softmax(route, dim=-1)
                v = squash(torch.einsum("bpmk,bpmke->bke", coupling, votes))
                if it + 1 < self.iters:
                    route = route + torch.einsum("bpmke,bke->bpmk", votes, v)
            scale = self.log_scale.float().exp()
            logits = scale * safe_norm(v)
            patch_logits = scale * safe_norm(squash(votes.sum(1)))
            routed = safe_norm(torch.einsum("bpmk,bpmke->bmke", coupling, votes))  # (B, M, K)
            predicted = logits.argmax(-1).view(-1, 1, 1).expand(-1, routed.shape[1], 1)
            share = routed.gather(-1, predicted).squeeze(-1)
            total = share.sum(1, keepdim=True)
            # All-zero votes (e.g. a blank image through a fresh model): uniform, never NaN.
            weights = torch.where(total > 0, share / total.clamp_min(1e-30),
                                  torch.full_like(share, 1.0 / share.shape[1]))
        return HeadOutput(logits, patch_logits, weights)
