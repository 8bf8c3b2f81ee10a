"""Attention maps of a model and the local-region Pearson transfer loss (docs/mutual_transfer.md):
what the trainer's team (:mod:`engine.team`) computes when its peers learn from each other.

- **Layers.** A backbone's map layers are its stages: its direct children (a lone container
  child, such as timm's ``body``, is opened; so is a container that is never called itself).
  The usable ones give a 4-D output with a spatial map; the deepest ``n`` make the global map.
- **Global map.** Forward hooks catch those layers' outputs in the same forward pass that gives
  the logits (no second pass). Each becomes the channel mean of |a|^p, is resized bilinearly to
  the common size, divided by its own L2 norm (so that no layer dominates), and the layers are
  summed. With ``map_source="patch_weights"`` the map is the patch weights on their grid.
- **Cost.** The map is made in the activation's precision (bf16 under autocast), its backward
  is one multiply in the activation's dtype and layout, and the resize is two small matrix
  products: docs/performance.md, "Mutual transfer's cost", says what each saved.
- **Local regions.** The common size is ``grid · r`` on each side with r >= 2, so every region
  is an r x r block and the regions are one reshape (no loop over regions or images).
- **Pearson.** ρ = Σ a'b' / sqrt((Σ a'^2 + ε n)(Σ b'^2 + ε n)) over a region of n pixels
  (a', b' centred; each map standardised over the image first). The ε keeps ρ and its gradient
  finite where a region is constant: there ρ = 0, and the gradient pulls the region towards the
  other peer's pattern.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError

EPS = 1e-4
"""ε per pixel of the Pearson denominator, on standardised maps (see region_pearson)."""


# ----------------------------------------------------------------------------------------------
# Which layers


def candidate_layers(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's stages in forward order (not yet checked for a spatial output)."""
    module, prefix = backbone, ""
    children = list(module.named_children())
    while len(children) == 1:  # a wrapper (timm's ``body``, a lone Sequential): look inside
        name, module = children[0]
        prefix += f"{name}."
        children = list(module.named_children())
    return [(prefix + name, child) for name, child in children]


@dataclass(frozen=True)
class MapLayer:
    name: str
    size: tuple[int, int]
    """Spatial size of the layer's output at the probed input size."""


def probe_layers(backbone: nn.Module, in_chans: int, input_size: tuple[int, int]
                 ) -> list[MapLayer]:
    """The usable layers (4-D output with at least a 2x2 map) and their map sizes, in forward
    order. A container whose own forward is never called (a model that loops over its blocks,
    as timm's MobileNet features do) is replaced by its children, up to three levels down."""
    modules = candidate_layers(backbone)
    found: dict[str, tuple[int, int]] = {}
    for _ in range(3):
        called = _probe(backbone, modules, in_chans, input_size, found)
        opened = []
        for name, module in modules:
            children = list(module.named_children())
            opened += ([(f"{name}.{n}", c) for n, c in children]
                       if name not in called and children else [(name, module)])
        if len(opened) == len(modules):
            break
        modules = opened
    return [MapLayer(n, found[n]) for n, _ in modules if n in found]


def _probe(backbone: nn.Module, modules: list[tuple[str, nn.Module]], in_chans: int,
           input_size: tuple[int, int], found: dict[str, tuple[int, int]]) -> set[str]:
    """One forward pass with a hook on every module: records the usable outputs' sizes in
    ``found`` and returns the names of the modules that were called at all."""
    called: set[str] = set()

    def hook_for(name: str):
        def hook(module, args, output):
            called.add(name)
            if isinstance(output, torch.Tensor) and output.dim() == 4 and min(
                    output.shape[-2:]) >= 2:
                found[name] = (int(output.shape[-2]), int(output.shape[-1]))
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules]
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, in_chans, *input_size, device=device))
    finally:
        backbone.train(was_training)
        for h in handles:
            h.remove()
    return called


def chosen_layers(backbone: nn.Module, in_chans: int, input_size: tuple[int, int], n: int,
                  what: str) -> list[MapLayer]:
    """The deepest ``n`` usable layers; a backbone without any is a ConfigError naming
    ``what`` (the config field of its backbone)."""
    usable = probe_layers(backbone, in_chans, input_size)
    if not usable:
        raise ConfigError(
            f"{what}: backbone {type(backbone).__name__} has no usable intermediate layer (no "
            "child module gives a spatial map of at least 2x2 that forward hooks can catch); "
            "choose another backbone, or transfer.map_source='patch_weights' for a "
            "Loss-Attention head")
    return usable[-n:]


# ----------------------------------------------------------------------------------------------
# Maps


class LayerTap:
    """Forward hooks that keep the latest output of the named layers in ``outputs``. A trainer
    keeps one for its whole life (hooks that stay put never make ``torch.compile`` retrace);
    :func:`captured` is the one-off form. ``close`` removes the hooks."""

    def __init__(self, backbone: nn.Module, names: Sequence[str]) -> None:
        modules = dict(backbone.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self.names = tuple(names)
        self._handles = [modules[n].register_forward_hook(self._hook_for(n)) for n in names]

    def _hook_for(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output
        return hook

    def take(self) -> list[torch.Tensor]:
        """The outputs of the last forward pass, in layer order (and forget them)."""
        return [self.outputs.pop(n) for n in self.names]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.outputs = [], {}


@contextlib.contextmanager
def captured(backbone: nn.Module, names: Sequence[str]) -> Iterator[LayerTap]:
    """A :class:`LayerTap` for the block; the hooks are always removed at its end."""
    tap = LayerTap(backbone, names)
    try:
        yield tap
    finally:
        tap.close()


def common_side(sides: Sequence[int], grid: int) -> int:
    """The side all maps are resized to: a multiple of ``grid`` with regions of >= 2 x 2, at
    least the largest map."""
    return grid * max(2, math.ceil(max(sides) / grid))


def _energy(a: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, 1, h, w), fp32 at least: the channel mean of a².

    On the CPU a bf16 activation is reduced as bf16: fp32 sums inside, then one bf16 rounding
    of the norm, ~0.4 % of the map and within the activation's own precision. Asking the CPU's
    vector_norm for an fp32 result instead made it copy the whole activation to fp32 first,
    which cost more than all the rest of the map (docs/performance.md, "Mutual transfer's
    cost"). Elsewhere (a GPU, not measured here) the result stays fp32, as before. Autocast is
    off so that it casts nothing either."""
    low = a.dtype == torch.bfloat16 and a.device.type == "cpu"
    with torch.autocast(a.device.type, enabled=False):
        norm = torch.linalg.vector_norm(
            a, 2, dim=1, keepdim=True,
            dtype=None if low else torch.promote_types(a.dtype, torch.float32))
    return norm.to(torch.promote_types(norm.dtype, torch.float32)).square_().div_(a.shape[1])


class _ChannelEnergy(torch.autograd.Function):
    """(B, C, h, w) -> (B, 1, h, w): :func:`_energy`, with a backward of one multiply whose
    result has the activation's dtype and memory format. Autograd's own ``(a * a).mean(1)``
    handed an fp32 gradient in another layout back to a bf16 channels_last activation, and
    the ReLU backward and gradient sum after it then ran on mismatched strides."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a)
        return _energy(a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        scale = (grad * (2.0 / a.shape[1])).to(a.dtype)
        out = torch.empty_like(a)  # keeps a's memory format (channels_last stays so)
        return torch.mul(a, scale, out=out)


def channel_map(features: torch.Tensor, power: float) -> torch.Tensor:
    """(B, C, h, w) -> (B, 1, h, w), fp32 at least: the channel mean of |a|^p (p = 2: fused,
    above)."""
    if power == 2:
        return _ChannelEnergy.apply(features)
    return features.float().abs().pow(power).mean(1, keepdim=True)


def unit_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A channel map (B, 1, h, w) resized to ``size`` and divided by its L2 norm (B, H, W)."""
    m = _resized(m, size) if tuple(m.shape[-2:]) != tuple(size) else m
    m = m.flatten(1)
    return (m / _nonzero(m.norm(dim=1, keepdim=True))).view(-1, *size)


def _resized(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) -> (B, H, W) bilinear (align_corners=False), as two small matrix products.
    Bilinear is linear along each axis in turn, so this is F.interpolate's result to fp32
    rounding (its own weights, made from the identity), and with its backward it takes a
    third of the time on the CPU, where upsample_bilinear2d's backward took 0.66 ms per call
    for small_cnn's 16x16 maps at batch 128."""
    rows = _linear_weights(m.shape[-2], size[0], m.dtype, m.device)
    cols = _linear_weights(m.shape[-1], size[1], m.dtype, m.device)
    with torch.autocast(m.device.type, enabled=False):  # matmuls would be bf16 under it
        return rows @ m[:, 0] @ cols.T


@functools.lru_cache(maxsize=64)
def _linear_weights(src: int, dst: int, dtype: torch.dtype, device: torch.device
                    ) -> torch.Tensor:
    """(dst, src): row i holds the weights of 1-D linear resizing's output i. Made outside
    inference mode: a cached inference tensor could never be saved for a backward later."""
    with torch.inference_mode(False):
        eye = torch.eye(src, dtype=torch.float64)[:, None, :]
        weights = F.interpolate(eye, size=dst, mode="linear", align_corners=False)[:, 0].T
        return weights.to(dtype=dtype, device=device).contiguous()


def layer_map(features: torch.Tensor, size: tuple[int, int], power: float) -> torch.Tensor:
    """(B, C, h, w) -> (B, H, W): channel mean of |a|^p, resized, divided by its L2 norm."""
    return unit_map(channel_map(features, power), size)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1: an all-zero map stays zero and its gradient stays
    finite (a clamp would pass 0 · ∞ = NaN back through the norm's square root)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def global_map(features: Sequence[torch.Tensor], size: tuple[int, int], power: float
               ) -> torch.Tensor:
    """The layers' maps summed (B, H, W)."""
    return torch.stack([layer_map(f, size, power) for f in features]).sum(0)


def grid_map(weights: torch.Tensor, rows: int, cols: int, size: tuple[int, int]
             ) -> torch.Tensor:
    """Patch weights (B, M) on their rows x cols grid, resized to ``size`` (B, H, W)."""
    m = weights.float().view(-1, 1, rows, cols)
    return _resized(m, size) if (rows, cols) != tuple(size) else m[:, 0]


# ----------------------------------------------------------------------------------------------
# Local regions and their correlation


def regions(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, H, W) with H, W multiples of ``grid`` -> (B, grid, grid, H/grid * W/grid)."""
    b, h, w = maps.shape
    if h % grid or w % grid:
        raise ValueError(f"map {h}x{w} does not divide into a {grid}x{grid} grid")
    rh, rw = h // grid, w // grid
    return maps.reshape(b, grid, rh, grid, rw).permute(0, 1, 3, 2, 4).reshape(b, grid, grid,
                                                                               rh * rw)


def region_pearson(a: torch.Tensor, b: torch.Tensor, grid: int) -> torch.Tensor:
    """Pearson ρ of corresponding local maps: (B, H, W) x 2 -> (B, grid, grid).

    Each map is first standardised over the image (mean 0, variance 1), and ε = 1e-4 per pixel
    is added to each region's sum of squares, so a region whose spread is under ~1 % of its
    map's is flat: a constant region gives ρ = 0, with a gradient bounded by
    1 / sqrt(ε · pixels per region) instead of an infinite one."""
    ra, rb = regions(_standardised(a), grid), regions(_standardised(b), grid)
    ca = ra - ra.mean(-1, keepdim=True)
    cb = rb - rb.mean(-1, keepdim=True)
    eps = EPS * ra.shape[-1]
    num = (ca * cb).sum(-1)
    den = ((ca * ca).sum(-1) + eps) * ((cb * cb).sum(-1) + eps)
    return num / den.sqrt()


def _standardised(maps: torch.Tensor) -> torch.Tensor:
    """Each map shifted and scaled to mean 0 and unit variance over the image (ρ of a region
    ignores both; the ε below is then relative to the map's own contrast)."""
    maps = maps.float()
    centred = maps - maps.mean((-2, -1), keepdim=True)
    return centred / _nonzero(centred.pow(2).mean((-2, -1), keepdim=True)).sqrt()


def transfer_loss(own: torch.Tensor, others: Sequence[torch.Tensor], grid: int) -> torch.Tensor:
    """Mean over the other peers, regions and images of 1 - ρ (the others are detached here,
    as in mutual learning: each peer learns from the others, not the reverse)."""
    terms = [(1.0 - region_pearson(own, other.detach(), grid)).mean() for other in others]
    return torch.stack(terms).mean()
