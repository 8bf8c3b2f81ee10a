"""Registries of backbones and heads (the timm / torchvision pattern) and config resolution.

The app's drop-downs are :func:`list_backbones` and :func:`list_heads`. Any timm model is also a
backbone under the name ``"timm:<model name>"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from engine.config import ModelConfig

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and what its defaults are."""

    name: str
    description: str
    build: Callable[..., nn.Module]
    """``build(cfg) -> module`` with ``out_channels`` and ``feature_geom(input_size)``."""
    base_plan: tuple[int, ...] | None
    """Stride plan of the Loss-Attention backbone at 32x32 (None: no plan, e.g. timm)."""
    upscale_order: tuple[int, ...] = ()
    """Stages that get stride 2, in order, for each doubling of the input beyond 32 px."""
    baseline_plan: tuple[int, ...] | None = None
    """Stride plan of the standard (unmodified) network, used by the ``plain`` head."""
    patch_defaults: dict[str, int] = field(default_factory=dict)
    """Defaults for ``patch_kernel``, ``patch_stride``, ``patch_channels``."""


@dataclass(frozen=True)
class HeadSpec:
    name: str
    description: str
    cls: type[nn.Module]


_BACKBONES: dict[str, BackboneSpec] = {}
_HEADS: dict[str, HeadSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _BACKBONES or spec.name.startswith(TIMM_PREFIX):
        raise ValueError(f"backbone name {spec.name!r} is taken or reserved")
    _BACKBONES[spec.name] = spec
    return spec


def register_head(spec: HeadSpec) -> HeadSpec:
    if spec.name in _HEADS:
        raise ValueError(f"head name {spec.name!r} is taken")
    _HEADS[spec.name] = spec
    return spec


def _ensure_registered() -> None:
    # The built-in entries live in engine.models.zoo; importing it fills the registries.
    import engine.models.zoo  # noqa: F401


def list_backbones() -> list[str]:
    """Registered backbone names; any ``timm:<model name>`` is a backbone too."""
    _ensure_registered()
    return [name for name in _BACKBONES if name != "timm"]


def backbone_descriptions() -> dict[str, str]:
    """Display name -> one-line description, the timm family shown as ``timm:<model name>``."""
    _ensure_registered()
    return {("timm:<model name>" if name == "timm" else name): spec.description
            for name, spec in _BACKBONES.items()}


def list_heads() -> list[str]:
    _ensure_registered()
    return list(_HEADS)


def backbone_spec(name: str) -> BackboneSpec:
    check_backbone_name(name)
    if name.startswith(TIMM_PREFIX):
        return _BACKBONES["timm"]
    return _BACKBONES[name]


def head_spec(name: str) -> HeadSpec:
    check_head_name(name)
    return _HEADS[name]


def check_backbone_name(name: object) -> None:
    from engine.config import ConfigError

    _ensure_registered()
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        import timm

        model = name[len(TIMM_PREFIX):]
        if not timm.is_model(model):
            raise ConfigError(f"backbone {name!r}: timm has no model {model!r} "
                              "(see timm.list_models())")
        return
    if not isinstance(name, str) or name not in _BACKBONES or name == "timm":
        known = list_backbones() + ["timm:<model name>"]
        raise ConfigError(f"backbone must be one of {known}; got {name!r}")


def check_head_name(name: object) -> None:
    from engine.config import ConfigError

    _ensure_registered()
    if not isinstance(name, str) or name not in _HEADS:
        raise ConfigError(f"head must be one of {list(_HEADS)}; got {name!r}")


def default_stride_plan(spec: BackboneSpec, input_size: tuple[int, int], plain: bool
                        ) -> tuple[int, ...] | None:
    """The paper's plan for this input size (one more stride-2 stage per doubling beyond 32 px),
    or the standard network's plan for the plain baseline."""
    if spec.base_plan is None:
        return None
    if plain and spec.baseline_plan is not None:
        return spec.baseline_plan
    doublings = max(0, round(math.log2(min(input_size) / 32)))
    plan = list(spec.base_plan)
    for stage in spec.upscale_order[:doublings]:
        plan[stage] = 2
    return tuple(plan)


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """Fill the ``None`` fields of a ModelConfig with the backbone's defaults."""
    from engine.config import ConfigError

    spec = backbone_spec(cfg.backbone)
    changes: dict[str, object] = {}
    if spec.base_plan is None:
        if cfg.stride_plan is not None:
            raise ConfigError(f"stride_plan is not used by backbone {cfg.backbone!r}; "
                              "use timm_output_stride for timm backbones")
    elif cfg.stride_plan is None:
        changes["stride_plan"] = default_stride_plan(spec, cfg.input_size, cfg.head == "plain")
    elif len(cfg.stride_plan) != len(spec.base_plan):
        raise ConfigError(f"stride_plan for backbone {cfg.backbone!r} needs "
                          f"{len(spec.base_plan)} entries (one per stage); got {cfg.stride_plan}")
    if not cfg.backbone.startswith(TIMM_PREFIX) and (cfg.timm_output_stride or cfg.pretrained):
        raise ConfigError("timm_output_stride and pretrained apply only to 'timm:' backbones; "
                          f"backbone is {cfg.backbone!r}")
    for name, value in spec.patch_defaults.items():
        if getattr(cfg, name) is None:
            changes[name] = value
    return cfg.replace(**changes) if changes else cfg
