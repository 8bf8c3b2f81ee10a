"""The patch model: backbone + head, returning one named structure for everything downstream."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from engine.config import ModelConfig
from engine.models.attention import threshold
from engine.models.geometry import PatchGrid, patch_grid
from engine.models.heads import Head
from engine.models.registry import backbone_spec, head_spec, resolve_config


class PatchOutput(NamedTuple):
    """What a model saw.

    ``logits`` (B, K) image logits; ``patch_logits`` (B, M, K) the shared classifier applied to
    each patch (channel-summed for capsules); ``patch_weights`` (B, M), summing to 1 per image;
    ``grid`` the patch geometry (rows, cols, pixel boxes). Patch fields are ``None`` for heads
    without patches (``plain``).
    """

    logits: torch.Tensor
    patch_logits: torch.Tensor | None
    patch_weights: torch.Tensor | None
    grid: PatchGrid | None


class PatchModel(nn.Module):
    """A backbone and a head built from a resolved :class:`ModelConfig` (kept as ``.config``)."""

    def __init__(self, config: ModelConfig, backbone: nn.Module, head: Head) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.head = head
        self._grids: dict[tuple[int, int], PatchGrid | None] = {}

    @property
    def regularised(self) -> bool:
        """Whether the patch-loss term applies (Loss-Attention heads)."""
        return self.head.regularised

    @property
    def selection(self) -> str:
        return self.head.selection

    def grid(self, input_size: tuple[int, int]) -> PatchGrid | None:
        """Patch geometry for an input size; raises ValueError if no patch fits.

        Python bookkeeping that ``torch.compile`` must not trace: :func:`compiled` wraps it in
        ``torch.compiler.disable`` only when compiling, since the decorator alone imports
        torch's compiler stack in every process (+2.8 s and 155 MiB measured)."""
        key = (int(input_size[0]), int(input_size[1]))
        if key not in self._grids:
            geom = self.head.patch_geom()
            feature = self.backbone.feature_geom(key)
            self._grids[key] = None if geom is None else patch_grid(key, feature, geom)
        return self._grids[key]

    def theta(self, grid: PatchGrid | None, xi: float | None = None) -> float:
        """Threshold θ for ``xi`` (default: the config's ξ)."""
        if grid is None:
            return 0.0
        return threshold(self.config.xi if xi is None else xi, self.config.xi_denominator, grid)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone + patch layer: the tokens that :meth:`decode` pools (cache them to re-decode
        at another ξ without the backbone)."""
        if x.dim() != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected images of shape (B, {self.config.in_chans}, H, W); "
                             f"got {tuple(x.shape)}")
        return self.head.encode(self.backbone(x))

    def decode(self, tokens: torch.Tensor, grid: PatchGrid | None, xi: float | None = None
               ) -> PatchOutput:
        out = self.head.decode(tokens, self.theta(grid, xi))
        return PatchOutput(out.logits, out.patch_logits, out.patch_weights, grid)

    @property
    def xi_dependent(self) -> bool:
        return self.head.xi_dependent

    def xi_cache(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compact per-image tensors from which :meth:`decode_cached` gives the outputs at any ξ
        without the backbone (see ``Head.xi_cache``)."""
        return self.head.xi_cache(self.encode(x))

    def decode_cached(self, cache: dict[str, torch.Tensor], grid: PatchGrid | None,
                      xi: float | None = None) -> PatchOutput:
        out = self.head.decode_cached(cache, self.theta(grid, xi))
        return PatchOutput(out.logits, out.patch_logits, out.patch_weights, grid)

    def forward(self, x: torch.Tensor, xi: float | None = None) -> PatchOutput:
        grid = self.grid(x.shape[-2:])
        return self.decode(self.encode(x), grid, xi)


class LogitsOnly(nn.Module):
    """Wraps a PatchModel for libraries that expect ``model(x) -> logits`` (e.g. Grad-CAM), at
    threshold ``xi`` (default: the model's own)."""

    def __init__(self, model: PatchModel, xi: float | None = None) -> None:
        super().__init__()
        self.model, self.xi = model, xi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, xi=self.xi).logits


def build_model(config: ModelConfig) -> PatchModel:
    """Build a model; raises ValueError (naming the field) if the config cannot give patches."""
    from engine.config import ConfigError

    config = resolve_config(config)
    backbone = backbone_spec(config.backbone).build(config)
    head = head_spec(config.head).cls(config, backbone.out_channels)
    model = PatchModel(config, backbone, head)
    try:
        model.grid(config.input_size)
    except ValueError as exc:
        raise ConfigError(f"input_size / stride_plan / patch_kernel: {exc}") from exc
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compiled(model: torch.nn.Module, net: torch.nn.Module | None = None) -> torch.nn.Module:
    """``torch.compile(net)`` (default: ``model``), with ``model.grid`` kept out of the graph."""
    if isinstance(model, PatchModel) and "grid" not in vars(model):
        model.grid = torch.compiler.disable(model.grid)
    return torch.compile(model if net is None else net)
