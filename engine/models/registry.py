"""Registries of backbones and heads, filled by the families' own modules.

The timm pattern: a family module decorates its classes with :func:`register_backbone` or
:func:`register_head`, and this module imports none of them (``engine.models`` imports the
families, so asking the registry anything loads them first). Everything the rest of the project
needs to know about a name lives in its spec: display text, defaults, recipe, stride plans. A new
backbone or head is therefore one file (or one class in a family's file) plus its test.

A backbone name may also be a *prefix family*: ``timm:`` + any timm model name. Prefix handling
lives here, in :func:`backbone_spec`, and nowhere else.

Names are checked here, when a spec is asked for, and not when a config is built; an unknown
name raises :class:`~engine.errors.ConfigError` naming the field and the known names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from engine.config import RECIPE_NAMES, XI_DENOMINATORS
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.config import ModelConfig



@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone, and its defaults."""

    name: str
    """The registered name; for a prefix family, the prefix (``"timm:"``)."""
    description: str
    build: Callable[[ModelConfig], nn.Module]
    """``build(cfg) -> module`` with ``out_channels`` and ``feature_geom(input_size)``."""
    base_plan: tuple[int, ...] | None = None
    """Stride plan of the Loss-Attention backbone at 32x32 (None: no plan, e.g. timm)."""
    upscale_order: tuple[int, ...] = ()
    """Stages that get stride 2, in order, for each doubling of the input beyond 32 px."""
    baseline_plan: tuple[int, ...] | None = None
    """Stride plan of the standard (unmodified) network, for heads that ask for it."""
    patch_defaults: dict[str, int] = field(default_factory=dict)
    """Defaults for ``patch_kernel``, ``patch_stride``, ``patch_channels``."""
    compare_plans: tuple[tuple[int, ...], ...] = ()
    """Stride plans worth comparing for time against accuracy (the Stride / time page)."""
    prefix: bool = False
    """The name is a prefix: ``name + <anything check_name accepts>`` is this backbone."""
    check_name: Callable[[str], None] | None = None
    """For a prefix family: raise ConfigError if the rest of the name is not a model."""

    @property
    def shown_name(self) -> str:
        return f"{self.name}<model name>" if self.prefix else self.name


@dataclass(frozen=True)
class HeadSpec:
    name: str
    description: str
    label: str
    """Short display name (drop-downs, tables)."""
    cls: type[nn.Module]
    recipe: str = "sgd"
    """Training recipe of ``train.recipe="auto"``: the paper trains Loss-Attention and the
    attention baselines with SGD, Mean-pooling and Dynamic Routing with Adam."""
    standard_backbone: bool = False
    """Use the backbone's standard (strided) plan by default: the paper's plain baselines."""
    released_xi_denominator: str | None = None
    """The threshold denominator of the authors' released code for this head, which the
    ``released-code`` preset sets (METHOD.md D1): ``"feature_map"`` for the conv head,
    ``"patches"`` for the capsule head; None where no released code thresholds (baselines)."""


_BACKBONES: dict[str, BackboneSpec] = {}
_HEADS: dict[str, HeadSpec] = {}


def register_backbone(name: str, *, description: str, prefix: bool = False, **spec):
    """Class decorator: register a backbone built by ``cls.from_config(cfg)``."""
    def decorate(cls):
        if name in _BACKBONES:
            raise ValueError(f"backbone name {name!r} is taken")
        _BACKBONES[name] = BackboneSpec(name, description, cls.from_config, prefix=prefix,
                                        **spec)
        return cls
    return decorate


def register_head(name: str, *, description: str, label: str, **spec):
    """Class decorator: register a head built by ``cls(cfg, backbone_channels)``."""
    def decorate(cls):
        if name in _HEADS:
            raise ValueError(f"head name {name!r} is taken")
        if spec.get("recipe", "sgd") not in RECIPE_NAMES:
            raise ValueError(f"head {name!r}: recipe must be one of {list(RECIPE_NAMES)}")
        if spec.get("released_xi_denominator") not in (None, *XI_DENOMINATORS):
            raise ValueError(f"head {name!r}: released_xi_denominator must be None or one of "
                             f"{list(XI_DENOMINATORS)}")
        _HEADS[name] = HeadSpec(name, description, label, cls, **spec)
        return cls
    return decorate


def list_backbones() -> list[str]:
    """Registered backbone names (prefix families are shown by :func:`backbone_descriptions`)."""
    return [name for name, spec in _BACKBONES.items() if not spec.prefix]


def backbone_descriptions() -> dict[str, str]:
    """Display name (``timm:<model name>`` for the timm family) -> one-line description."""
    return {spec.shown_name: spec.description for spec in _BACKBONES.values()}


def list_heads() -> list[str]:
    return list(_HEADS)


def backbone_spec(name: object) -> BackboneSpec:
    """The spec of a backbone name; raises ConfigError for a name no family knows."""
    if isinstance(name, str):
        spec = _BACKBONES.get(name)
        if spec is not None and not spec.prefix:
            return spec
        for family in _BACKBONES.values():
            if family.prefix and name.startswith(family.name):
                if family.check_name is not None:
                    family.check_name(name[len(family.name):])
                return family
    known = [spec.shown_name for spec in _BACKBONES.values()]
    raise ConfigError(f"model.backbone must be one of {known}; got {name!r}")


def head_spec(name: object) -> HeadSpec:
    if not isinstance(name, str) or name not in _HEADS:
        raise ConfigError(f"model.head must be one of {list(_HEADS)}; got {name!r}")
    return _HEADS[name]


def default_stride_plan(spec: BackboneSpec, input_size: tuple[int, int], standard: bool
                        ) -> tuple[int, ...] | None:
    """The paper's plan for this input size (one more stride-2 stage per doubling beyond 32 px),
    or the standard network's plan when the head asks for it."""
    if spec.base_plan is None:
        return None
    if standard and spec.baseline_plan is not None:
        return spec.baseline_plan
    doublings = max(0, round(math.log2(min(input_size) / 32)))
    plan = list(spec.base_plan)
    for stage in spec.upscale_order[:doublings]:
        plan[stage] = 2
    return tuple(plan)


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """Check the names and fill the ``None`` fields of a ModelConfig with the backbone's
    defaults."""
    spec = backbone_spec(cfg.backbone)
    head = head_spec(cfg.head)
    changes: dict[str, object] = {}
    if spec.base_plan is None:
        if cfg.stride_plan is not None:
            raise ConfigError(f"model.stride_plan is not used by backbone {cfg.backbone!r}; "
                              "use model.timm_output_stride for timm backbones")
    elif cfg.stride_plan is None:
        changes["stride_plan"] = default_stride_plan(spec, cfg.input_size, head.standard_backbone)
    elif len(cfg.stride_plan) != len(spec.base_plan):
        raise ConfigError(f"model.stride_plan for backbone {cfg.backbone!r} needs "
                          f"{len(spec.base_plan)} entries (one per stage); got {cfg.stride_plan}")
    if not spec.prefix and (cfg.timm_output_stride or cfg.pretrained):
        raise ConfigError("model.timm_output_stride and model.pretrained apply only to 'timm:' "
                          f"backbones; backbone is {cfg.backbone!r}")
    for name, value in spec.patch_defaults.items():
        if getattr(cfg, name) is None:
            changes[name] = value
    return cfg.replace(**changes) if changes else cfg
