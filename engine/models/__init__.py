"""Models: backbones, patch layers and heads behind one registry and ``build_model``.

The families register themselves when imported: the import below is what fills the registry
(a new family module is added to it).
"""

from engine.models import backbones, heads  # noqa: F401 - they register their classes
from engine.models.attention import (
    capsule_attention,
    loss_attention_weights,
    safe_norm,
    threshold,
    threshold_weights,
)
from engine.models.geometry import LayerGeom, MapGeom, PatchGrid, compose, patch_grid
from engine.models.model import (
    LogitsOnly,
    PatchModel,
    PatchOutput,
    build_model,
    compiled,
    count_parameters,
)
from engine.models.registry import (
    backbone_descriptions,
    backbone_spec,
    head_spec,
    list_backbones,
    list_heads,
    resolve_config,
)

__all__ = [
    "LayerGeom",
    "LogitsOnly",
    "MapGeom",
    "PatchGrid",
    "PatchModel",
    "PatchOutput",
    "backbone_descriptions",
    "backbone_spec",
    "build_model",
    "capsule_attention",
    "compiled",
    "compose",
    "count_parameters",
    "head_spec",
    "list_backbones",
    "list_heads",
    "loss_attention_weights",
    "patch_grid",
    "resolve_config",
    "safe_norm",
    "threshold",
    "threshold_weights",
]
