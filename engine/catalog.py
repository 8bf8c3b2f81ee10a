"""The model catalog (backbone and head names with their one-line descriptions) without
importing torch: ``python -m engine models`` only lists, and importing torch is most of its
time (2.3 of 2.5 s on the 2-core machine, where the target is 1.5 s).

The names and descriptions are the literal arguments of the ``@register_backbone`` /
``@register_head`` decorators, read from the modules' source with :mod:`ast`, in the order the
registry gets them; ``tests/test_models.py`` checks that they equal the live registry's.
"""

from __future__ import annotations

import ast
from pathlib import Path

_MODELS = Path(__file__).resolve().parent / "models"  # not imported: engine.models imports torch
# The modules whose decorators fill the registry, in the order engine.models imports them.
_BACKBONE_MODULES = ("backbones.py",)
_HEAD_MODULES = ("heads.py",)


def _registrations(files: tuple[str, ...], decorator: str) -> list[tuple[str, str, bool]]:
    """(name, description, prefix) of every top-level class decorated
    ``@decorator("name", description=..., ...)``, in source order (the registry's order)."""
    out = []
    for file in files:
        tree = ast.parse((_MODELS / file).read_text(encoding="utf-8"), filename=file)
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Name)
                        and deco.func.id == decorator):
                    kwargs = {k.arg: k.value for k in deco.keywords}
                    prefix = "prefix" in kwargs and ast.literal_eval(kwargs["prefix"])
                    out.append((ast.literal_eval(deco.args[0]),
                                ast.literal_eval(kwargs["description"]), bool(prefix)))
    return out


def backbone_catalog() -> dict[str, str]:
    """Shown name (``timm:<model name>`` for a prefix family) -> description, as
    :func:`engine.models.backbone_descriptions` gives them."""
    return {f"{name}<model name>" if prefix else name: text
            for name, text, prefix in _registrations(_BACKBONE_MODULES, "register_backbone")}


def head_catalog() -> dict[str, str]:
    """Head name -> description, in registry order."""
    return {name: text for name, text, _ in _registrations(_HEAD_MODULES, "register_head")}


# The shipped γmax family's names (engine.gamma_family makes and describes it; it imports torch)
FAMILY_GAMMAS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
FAMILY_PREFIX = "digits_live_gamma"
FAMILY_DEFAULT_GAMMA = 0.3
"""The live preset's own γmax: the member a plain ``python -m engine train`` trains."""


def family_checkpoint_name(gamma: float) -> str:
    """The shipped family member's file name in ``checkpoints/``: ``digits_live_gamma0.3.pt``."""
    return f"{FAMILY_PREFIX}{gamma:g}.pt"
