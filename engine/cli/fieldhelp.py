"""Help texts of the flags that set config fields, made from one source: the field's docstring
in :mod:`engine.config` (the string literal under it), its choices from the registries and the
config's own constants, and its default as a plain run resolves it, per preset.

Nothing is copied into a table that could drift: the docstrings are read from the dataclasses'
source with :mod:`ast` (the way :mod:`engine.catalog` reads the registries), and only when help
is shown (:class:`engine.cli.common.Deferred`), so a command that runs never pays for it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (the string literal right under it), as plain text."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = plain(after.value.value)
    return docs


def plain(text: str) -> str:
    """Docstring markup as a terminal shows it: ``code`` and :role:`target` as their text, one
    line."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return " ".join(text.split())


def _section_class(section: str) -> type:
    from engine import config

    return {"model": config.ModelConfig, "data": config.DataConfig, "loss": config.LossConfig,
            "train": config.TrainConfig, "transfer": config.TransferConfig}[section]


def choices(section: str, key: str) -> list[str] | None:
    """The values a field takes, where they form a list: from the registries (backbones,
    heads, data sets) and the config's own constants, the ones its validation checks."""
    from engine import config

    path = f"{section}.{key}"
    if path == "model.backbone":
        from engine.catalog import backbone_catalog

        return list(backbone_catalog())
    if path == "model.head":
        from engine.catalog import head_catalog

        return list(head_catalog())
    if path == "data.dataset":
        from engine.data import list_datasets

        return list_datasets()
    constants = {"model.xi_denominator": config.XI_DENOMINATORS,
                 "train.recipe": config.RECIPES, "loss.ramp_by": config.RAMP_UNITS,
                 "data.resize": config.RESIZE_POLICIES, "transfer.map_source": config.MAP_SOURCES,
                 "train.device": (*config.DEVICE_CHOICES, "cuda:N")}
    return list(constants[path]) if path in constants else None


def _shown(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, tuple | list):
        return json.dumps(list(value))
    return "None" if value is None else json.dumps(value)


DATA_SETS_OWN = "auto"
"""A command whose runs get their data set's own preset when none is named (train, sweep)."""


def preset_defaults(section: str, key: str) -> dict[str, object]:
    """What a run on the default data set that gives no flags gets for the field: under each
    named preset, and under ``none`` (the RunConfig default)."""
    from engine.preset_fill import fill_preset
    from engine.presets import preset_names

    cls = _section_class(section)
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    default = (field.default_factory() if field.default is dataclasses.MISSING
               else field.default)

    def value(filled: dict):
        part = filled.get(section)
        return part.get(key, default) if isinstance(part, dict) else default

    return {**{name: value(fill_preset({"preset": name})) for name in preset_names()},
            "none": default}


def default_text(section: str, key: str, own: str = DATA_SETS_OWN) -> str:
    """``default: 2 (the live preset); 200 with --preset paper, released-code, none``. ``own``:
    the preset a run gets when it names none (``auto``: the default data set's)."""
    from engine.preset_fill import default_preset

    if own == DATA_SETS_OWN:
        own = default_preset({}) or "none"
    values = preset_defaults(section, key)
    value = values[own]
    others: dict[str, list[str]] = {}
    for name, v in values.items():
        if name != own and v != value:
            others.setdefault(_shown(v), []).append(name)
    if not others:
        return f"default: {_shown(value)}"
    where = f" (the {own} preset)" if own != "none" else ""
    return f"default: {_shown(value)}{where}; " + "; ".join(
        f"{v} with --preset {', '.join(names)}" for v, names in others.items())


def field_help(section: str, key: str, own: str = DATA_SETS_OWN) -> str:
    """The whole help of the flag that sets ``section.key``: what it does, its choices and its
    default (``own``: as :func:`default_text`)."""
    doc = field_docs(_section_class(section)).get(key)
    if doc is None:
        raise KeyError(f"{section}.{key} has no docstring in engine.config (every field a flag "
                       "sets needs one: it is the flag's help)")
    listed = choices(section, key)
    parts = [doc.rstrip(".") + "."]
    if listed:
        parts.append(f"One of: {', '.join(listed)}.")
    default = default_text(section, key, own)
    parts.append(f"{default[0].upper()}{default[1:]}. [{section}.{key}]")
    return " ".join(parts).replace("%", "%%")  # argparse formats help with %
