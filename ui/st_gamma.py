"""Streamlit services of the Patch Explorer's γmax slider: which trained models it slides over.

γmax shapes training, so each stop of the slider is a model of its own: a shipped family
(``checkpoints/``: the live family, γmax 0 to 3; the 30-epoch pair, 0 and 0.1) or the cells
of a finished sweep. A set of models is a family only where their configs are one experiment
except γmax (:func:`engine.explore.gamma_families`); a sweep that varies more than that can
be slid over only along the cells beside the model being explained, and otherwise is refused
with the fields that differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from ui.st_models import model_sources, run_config_at, store

NONE = "this model only"


@dataclass(frozen=True)
class GammaSource:
    """What a γmax slider can slide over: ``stops`` (γmax -> model source label, ascending),
    or a ``problem`` that says why not; ``note`` says what the stops share, where a sweep
    varies more than γmax."""

    name: str
    stops: dict[float, str] = field(default_factory=dict)
    problem: str = ""
    note: str = ""


def gamma_sources(current: str | None) -> list[GammaSource]:
    """Every family the slider can slide over, for the model ``current`` (a model source
    label): the shipped families, then each sweep with finished cells. Looked up again at most
    every 10 s (a sweep's cells may finish), not on every rerun."""
    return _gamma_sources(current, str(store().root))


def source_of(sources: list[GammaSource], current: str | None) -> GammaSource | None:
    """The source among ``sources`` whose stops hold ``current``."""
    return next((s for s in sources if current in s.stops.values()), None)


def _configs(labels) -> dict[str, dict]:
    sources = model_sources()
    configs = {}
    for label in labels:
        path = sources.get(label)
        if path and Path(path).is_file():
            config = run_config_at(path, Path(path).stat().st_mtime_ns)
            if config is not None:
                configs[label] = config
    return configs


@st.cache_data(ttl=10, max_entries=32, show_spinner=False)
def _gamma_sources(current: str | None, root: str) -> list[GammaSource]:
    del root  # the cache key: another run store has other sweeps
    from engine.explore import gamma_families

    shipped = _configs([label for label in model_sources() if label.startswith("shipped: ")])
    found = [GammaSource(_family_name(shipped[next(iter(f.values()))], f), f)
             for f in gamma_families(shipped)]
    found += [source for source in _sweep_sources(current) if source is not None]
    return found


def _family_name(config: dict, stops: dict[float, str]) -> str:
    """A shipped family by its recipe, short enough for a narrow select: ``live preset, 7
    models``, ``no preset, 2 models``."""
    preset = config.get("preset")
    return f"{f'{preset} preset' if preset else 'no preset'}, {len(stops)} models"


def _sweep_sources(current: str | None) -> list[GammaSource | None]:
    from engine.job_status import State
    from engine.sweep import list_sweeps, sweep_runs

    out = []
    for sweep in list_sweeps(store()):
        labels = [f"run: {run.name}" for run in sweep_runs(store(), sweep)
                  if run.status().state == State.FINISHED]
        out.append(_sweep_source(sweep, _configs(labels), current))
    return out


def _sweep_source(sweep: str, configs: dict[str, dict], current: str | None
                  ) -> GammaSource | None:
    """A sweep's γmax stops beside ``current`` (or its only family), or why there are none."""
    from engine.explore import flat_config, gamma_families, varied_fields_beyond_gamma

    if len(configs) < 2:
        return None
    name = f"sweep {sweep}"
    families = gamma_families(configs)
    varied = varied_fields_beyond_gamma(list(configs.values()))
    family = next((f for f in families if current in f.values()), None)
    if family is None and len(families) == 1:
        family = families[0]
    if family is None:
        fields = ", ".join(varied) or "nothing"
        if not families:
            return GammaSource(name, problem=f"{name}: no two finished cells differ only in "
                                             f"γmax; they differ in {fields}.")
        return GammaSource(name, problem=f"{name}: its cells differ in more than γmax "
                                         f"({fields}). Open one of its cells in the sidebar to "
                                         "slide over the cells beside it.")
    anchor = flat_config(configs[next(iter(family.values()))])
    fixed = [f"{f} = {anchor[f]}" for f in varied if f in anchor]
    return GammaSource(name, family, note=("the cells with " + ", ".join(fixed)) if fixed
                       else "")


def adopt_link_gamma(params: dict[str, str]) -> None:
    """A link's ``gamma``: the model of the link's model's family trained at that γmax (the
    link's model is chosen already). A γmax the family has no model for is named and
    ignored."""
    from ui.st_session import MODEL_KEY, remember, remembered

    text = params.get("gamma")
    if text is None:
        return
    current = remembered(MODEL_KEY)
    source = source_of(gamma_sources(current), current)
    stops = source.stops if source else {}
    try:  # as the link wrote it (:g): a γmax like 0.1234567 is 0.123457 in a link
        wanted = f"{float(text):g}"
    except ValueError:
        wanted = None
    stop = next((label for g, label in stops.items() if f"{g:g}" == wanted), None)
    own = _own_gamma(current)
    if stop is None and own is not None and f"{own:g}" == wanted:
        return  # the model's own γmax (a link to a model of no family)
    if stop is None:
        listed = ", ".join(f"{g:g}" for g in stops) or "none"
        st.warning(f"The link's γmax {text!r} is not a stop of this model's family (stops: "
                   f"{listed}); showing {current}.")
        return
    remember(MODEL_KEY, stop)


def _own_gamma(label: str | None) -> float | None:
    from engine.explore import gamma_of_config

    config = _configs([label]).get(label) if label else None
    try:
        return gamma_of_config(config) if config is not None else None
    except ValueError:
        return None
