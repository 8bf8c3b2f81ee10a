"""MIL networks: the MI-Net embedding (fc 256-128-64) with a pooling head, and the loss.

Bags of different sizes are processed together without padding: the instances of a batch of bags
are one (N, D) matrix and ``bag`` (N,) says which bag each row belongs to. Softmax, sums and
arg-max over a bag's instances are segment operations (``index_add`` / ``scatter_reduce``), so
there is no Python loop over bags or instances.

Heads (``MIL_METHODS``):

- ``loss_attention`` (AAAI 2020 Eq. 5): instance logits o_n = W h_n + b with the *bag
  classifier's* W, b; α = softmax over the bag's instances of logsumexp_k o_{n,k}; bag logits
  z = W Σ α_n h_n + b. No parameters of its own. Trained with CE + λ Σ α CE(o_n, Y).
- ``tip_threshold``: the TIP 2021 weights on bags: ℓ2,1-normalised instance-logit norms,
  thresholded at ξ/N (N = the bag's size), renormalised; same instance loss.
- ``attention`` / ``gated_attention`` (Ilse et al. 2018) and ``mean`` pooling: plain CE
  (METHOD.md project decisions: baselines have no instance term).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.attention import safe_norm, threshold_groups

_TINY = 1e-30


# ----------------------------------------------------------------------------------------------
# Segment (per-bag) operations


def segment_sum(x: torch.Tensor, bag: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Sum the rows of ``x`` (N, ...) per bag -> (n_bags, ...)."""
    return x.new_zeros((n_bags, *x.shape[1:])).index_add(0, bag, x)


def segment_max(x: torch.Tensor, bag: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Per-bag maximum of a 1-D ``x`` -> (n_bags,). Bags without rows give -inf."""
    out = x.new_full((n_bags,), float("-inf"))
    return out.scatter_reduce(0, bag, x, reduce="amax", include_self=True)


def segment_softmax(scores: torch.Tensor, bag: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Softmax of 1-D ``scores`` over the rows of each bag."""
    # The max shifts every score of a bag alike, which leaves the softmax (and its gradient)
    # unchanged; detaching it only saves work.
    shifted = scores - segment_max(scores.detach(), bag, n_bags)[bag]
    e = shifted.exp()
    return e / segment_sum(e, bag, n_bags)[bag].clamp_min(_TINY)


# ----------------------------------------------------------------------------------------------
# Instance weights as pure functions (known-answer tested)


def loss_attention_weights(instance_logits: torch.Tensor, bag: torch.Tensor,
                           n_bags: int) -> torch.Tensor:
    """AAAI Eq. 5: α_n = Σ_k exp(o_nk) / Σ_n' Σ_k exp(o_n'k) within each bag = softmax over the
    bag's instances of logsumexp_k(o_n). ``instance_logits`` (N, K) -> α (N,)."""
    return segment_softmax(torch.logsumexp(instance_logits, dim=1), bag, n_bags)


def tip_threshold_weights(instance_logits: torch.Tensor, bag: torch.Tensor, n_bags: int,
                          xi: float) -> torch.Tensor:
    """TIP Eq. 5 on bags: â_n = ||o_n|| / Σ ||o_n'||, t_n = ReLU(â_n - ξ/N_bag), α = t / Σ t.
    A bag whose weights would all be 0 keeps its top instance at weight 1 (never NaN). The
    threshold is the image model's own (``threshold_groups``), with bags for groups."""
    if not 0.0 <= xi <= 1.0:
        raise ValueError(f"xi must be in [0, 1]; got {xi!r}")

    def total(x: torch.Tensor) -> torch.Tensor:
        return segment_sum(x, bag, n_bags)[bag]

    norms = safe_norm(instance_logits, dim=1)
    scores = norms / total(norms).clamp_min(_TINY)
    sizes = total(torch.ones_like(scores))
    return threshold_groups(scores, xi / sizes, total,
                            lambda s: s == segment_max(s, bag, n_bags)[bag])


# ----------------------------------------------------------------------------------------------
# The network (optionally F independent copies trained side by side)


@dataclass
class MilOutput:
    logits: torch.Tensor
    """(B, K) bag logits; (F, B, K) for F members."""
    instance_logits: torch.Tensor
    """(N, K) the bag classifier applied to every instance embedding; (F, N, K)."""
    weights: torch.Tensor
    """(N,) instance weights α, summing to 1 within each bag; (F, N)."""


class MemberLinear(nn.Module):
    """``F`` independent linear layers applied to ``(F, N, in)`` at once (one batched matmul).
    Each member is initialised like ``nn.Linear``."""

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(members, 1, out_features))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default init for weight and bias
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class SharedDropout(nn.Module):
    """Dropout on (F, N, d) with one mask for all F members.

    Each member still sees an ordinary dropout mask; sharing it across the independent members
    only saves drawing F masks, which on CPU cost more than the matrix products of a MUSK2 epoch.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * F.dropout(x.new_ones((1, *x.shape[1:])), self.p, training=True)


def _global_bags(bag: torch.Tensor, members: int, n_bags: int) -> torch.Tensor:
    """Bag index of every row of (F, N) made unique across members: f * n_bags + bag."""
    offsets = torch.arange(members, device=bag.device).unsqueeze(1) * n_bags
    return (offsets + bag.expand(members, -1)).reshape(-1)


class MilNet(nn.Module):
    """MI-Net embedding (fc + ReLU + dropout per layer), a pooling head, and one linear classifier
    shared by bags and instances.

    ``members`` > 1 holds that many independent networks (e.g. the 50 folds of a 5 x 10 CV) that
    train side by side in one batched forward; they share nothing but the input rows.
    """

    def __init__(self, in_features: int, method: str = "loss_attention",
                 hidden: tuple[int, ...] = (256, 128, 64), dropout: float = 0.5,
                 num_classes: int = 2, attention_dim: int = 64, xi: float = 0.1,
                 members: int = 1) -> None:
        super().__init__()
        if method not in MIL_METHODS:
            raise ValueError(f"method must be one of {list(MIL_METHODS)}; got {method!r}")
        self.method, self.xi, self.members = method, xi, members
        self.spec = MIL_METHODS[method]
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [MemberLinear(members, width, h), nn.ReLU(), SharedDropout(dropout)]
            width = h
        self.embed = nn.Sequential(*layers)
        self.classifier = MemberLinear(members, width, num_classes)
        if self.spec.gates >= 1:
            self.att_v = MemberLinear(members, width, attention_dim)
            self.att_w = MemberLinear(members, attention_dim, 1)
        if self.spec.gates >= 2:
            self.att_u = MemberLinear(members, width, attention_dim)

    @property
    def regularised(self) -> bool:
        """Whether the loss has the instance term λ Σ α CE(o_n, Y)."""
        return self.spec.regularised

    def _weights(self, h: torch.Tensor, o: torch.Tensor, gbag: torch.Tensor,
                 n: int) -> torch.Tensor:
        """α of all rows, flat (F*N,), from embeddings h (F, N, d) and logits o (F, N, K)."""
        return self.spec.weights(self, h, o.reshape(-1, o.shape[-1]), gbag, n)

    def forward(self, x: torch.Tensor, bag: torch.Tensor, n_bags: int) -> MilOutput:
        """``x``: instances (N, D), or (F, N, D) for F members; ``bag``: (N,) or (F, N) long in
        [0, n_bags), the bag of each row (shared by all members when 1-D)."""
        single = x.dim() == 2
        if single:
            x = x.unsqueeze(0)
        members, rows = x.shape[0], x.shape[1]
        if members != self.members:
            raise ValueError(f"input has {members} member(s); the network has {self.members}")
        h = self.embed(x)
        o = self.classifier(h)
        gbag = _global_bags(bag, members, n_bags)
        alpha = self._weights(h, o, gbag, members * n_bags)
        pooled = segment_sum(alpha.unsqueeze(1) * h.reshape(members * rows, -1), gbag,
                             members * n_bags).view(members, n_bags, -1)
        out = MilOutput(self.classifier(pooled), o, alpha.view(members, rows))
        if single:
            out = MilOutput(out.logits[0], out.instance_logits[0], out.weights[0])
        return out


# ----------------------------------------------------------------------------------------------
# The methods: one table entry each


def _attention_weights(net: MilNet, h, flat_o, gbag, n):
    """Ilse et al.: softmax over the bag of wᵀ tanh(V h), gated by sigm(U h) when gated."""
    gate = torch.tanh(net.att_v(h))
    if net.spec.gates >= 2:
        gate = gate * torch.sigmoid(net.att_u(h))
    return segment_softmax(net.att_w(gate).reshape(-1), gbag, n)


def _mean_weights(net: MilNet, h, flat_o, gbag, n):
    return 1.0 / segment_sum(torch.ones_like(flat_o[:, 0]), gbag, n)[gbag]


@dataclass(frozen=True)
class MilMethod:
    name: str
    label: str
    """Display name (the MIL page)."""
    regularised: bool
    """The loss adds the instance term λ Σ α CE(o_n, Y)."""
    weights: Callable
    """``weights(net, h, flat_instance_logits, global_bag, n_bags) -> α`` (flat)."""
    gates: int = 0
    """Attention layers of its own: 0 none, 1 Ilse's attention, 2 the gated variant."""


MIL_METHODS: dict[str, MilMethod] = {m.name: m for m in (
    MilMethod("loss_attention", "Loss-Attention (AAAI 2020)", True,
              lambda net, h, o, g, n: loss_attention_weights(o, g, n)),
    MilMethod("attention", "Attention (Ilse)", False, _attention_weights, gates=1),
    MilMethod("gated_attention", "Gated attention (Ilse)", False, _attention_weights, gates=2),
    MilMethod("mean", "Mean pooling", False, _mean_weights),
    MilMethod("tip_threshold", "TIP ℓ2,1 + threshold", True,
              lambda net, h, o, g, n: tip_threshold_weights(o, g, n, net.xi)),
)}


# ----------------------------------------------------------------------------------------------
# The loss


def mil_loss(out: MilOutput, labels: torch.Tensor, bag: torch.Tensor, lam: float,
             regularised: bool = True, bag_mask: torch.Tensor | None = None,
             per_member: bool = False, instance_loss: str = "sum") -> torch.Tensor:
    """AAAI Eq. 7 without the consistency term (ω = 0 for the MIL benchmarks): the mean over bags
    of CE(z, Y) + λ Σ_n α_n CE(o_n, Y), where every instance takes its bag's label.
    ``instance_loss="mean"`` divides a bag's instance term by its size N, as the released code
    does (``MilConfig.instance_loss``).

    For F members (3-D logits): ``labels`` (B,) or (F, B), ``bag`` (N,) or (F, N), and
    ``bag_mask`` (F, B) marks the bags each member learns from (others add exactly 0). Returns
    the sum of the members' losses, or the (F,) vector with ``per_member``."""
    logits, inst_logits, weights = out.logits, out.instance_logits, out.weights
    if logits.dim() == 2:
        logits, inst_logits, weights = logits[None], inst_logits[None], weights[None]
    members, n_bags, k = logits.shape
    labels = labels.expand(members, n_bags)
    per_bag = F.cross_entropy(logits.reshape(-1, k), labels.reshape(-1),
                              reduction="none").view(members, n_bags)
    if regularised and lam > 0:
        bag = bag.expand(members, -1)
        inst_labels = torch.gather(labels, 1, bag)
        inst = F.cross_entropy(inst_logits.reshape(-1, k), inst_labels.reshape(-1),
                               reduction="none")
        gbag = _global_bags(bag, members, n_bags)
        term = segment_sum(weights.reshape(-1) * inst, gbag, members * n_bags)
        if instance_loss == "mean":
            term = term / segment_sum(torch.ones_like(inst), gbag, members * n_bags).clamp_min(1)
        elif instance_loss != "sum":
            raise ValueError(f"instance_loss must be 'sum' or 'mean'; got {instance_loss!r}")
        per_bag = per_bag + lam * term.view(members, n_bags)
    if bag_mask is None:
        losses = per_bag.mean(1)
    else:
        kept = torch.where(bag_mask, per_bag, torch.zeros_like(per_bag))
        losses = kept.sum(1) / bag_mask.sum(1).clamp_min(1)
    return losses if per_member else losses.sum()
