"""Filling a run's preset (:mod:`engine.presets`) into the settings a user gave.

Kept apart from the preset table because a rule's context needs the head registry (which head
thresholds how, which recipe it trains with), and the table must stay importable by the config
without the models. Used by the CLI (``train``, ``sweep``), the sweep cells and the Train page.
"""

from __future__ import annotations

from engine.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from engine.models import head_spec
from engine.presets import PresetContext, check_preset_name, fill_absent, preset_settings


def fill_preset(data: dict) -> dict:
    """The not-yet-validated RunConfig JSON ``data`` with the settings of its preset
    (``data["preset"]``, :mod:`engine.presets`) filled in where ``data`` does not give them:
    the recipe defaults < the preset < what the user gave.

    Every model of the run (``model`` and each transfer peer) gets the preset's model settings
    for its own head; the other sections follow ``model``. A section that is not a JSON object
    is left as it is, for validation to refuse. ``data`` that has no ``preset`` key gets its
    data set's default preset (``DatasetSpec.default_preset``: ``live`` for the digits), which
    is then recorded; ``"preset": null`` asks for none. Without a preset ``data`` is returned
    as it is; a resolved config.json gives every field, so for it the result equals ``data``."""
    name = data["preset"] if "preset" in data else default_preset(data)
    if name is None:
        return data
    check_preset_name(name)
    model = json_object(data, "model")
    if model is None:
        return data
    settings = preset_settings(name, preset_context(data, model))
    filled = {**data, "preset": name}
    for section in ("model", "data", "loss", "train"):
        part = json_object(data, section)
        if part is not None:
            filled[section] = fill_absent(part, settings, section)
    transfer = data.get("transfer")
    if isinstance(transfer, dict) and isinstance(transfer.get("peers"), list):
        filled["transfer"] = {**transfer, "peers": [
            fill_absent(peer, preset_settings(name, preset_context(data, peer)), "model")
            if isinstance(peer, dict) else peer for peer in transfer["peers"]]}
    return filled


def json_object(data: dict, section: str) -> dict | None:
    """``data[section]`` if it is an object, {} if absent, None if it is anything else."""
    value = data.get(section, {})
    return value if isinstance(value, dict) else None


def preset_context(data: dict, model: dict) -> PresetContext:
    """The facts a preset's rules read, resolved as :func:`prepare_run_config` will: the head
    (its spec says the released code's threshold denominator), the data set, the recipe."""
    head = model.get("head", ModelConfig.head)
    spec = head_spec(head)  # an unknown head is the same error validation would give
    recipe = (json_object(data, "train") or {}).get("recipe", TrainConfig.recipe)
    dataset = (json_object(data, "data") or {}).get("dataset", DataConfig.dataset)
    return PresetContext(head=head, dataset=str(dataset),
                         recipe=spec.recipe if recipe == "auto" else str(recipe),
                         released_xi_denominator=spec.released_xi_denominator)


def default_preset(data: dict) -> str | None:
    """The preset of the data set ``data`` names (None for an unknown one: validation says
    so)."""
    from engine.data.registry import dataset_spec  # importing engine.data registers the sets

    dataset = (json_object(data, "data") or {}).get("dataset", DataConfig.dataset)
    try:
        return dataset_spec(dataset).default_preset
    except ConfigError:
        return None
