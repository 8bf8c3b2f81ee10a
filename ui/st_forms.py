"""The run-settings form shared by Train, Sweep and Stride / time, and run-status widgets."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from engine.config import ConfigError, RunConfig, config_from_dict
from engine.data import DataError, list_datasets
from engine.data.registry import dataset_spec
from engine.device import DEVICE_CHOICES
from engine.job_status import State, Status
from engine.models import head_spec, list_backbones, list_heads
from engine.preset_fill import fill_preset, preset_context
from engine.presets import PRESETS, preset_settings
from engine.roots import data_roots, folder_in_root, shown_relative
from engine.runs import Run
from ui.st_session import keep

PRESET_CHOICES = ["", *PRESETS]  # "": no preset, the recipe defaults
FORM_FIELDS = {"model.backbone": "backbone", "model.xi": "xi", "loss.gamma_max": "gamma",
               "train.epochs": "epochs", "train.batch_size": "batch",
               "data.train_size": "train_size"}
"""Preset settings that the run form has fields for: section.field -> the field's key, after
the form's prefix (``tr_xi``)."""


def preset_label(name: str) -> str:
    return f"{name}: {PRESETS[name].description}" if name else "none (recipe defaults)"


def _preset_of_form(prefix: str, name: str) -> dict:
    """What preset ``name`` sets for the head and data set now chosen in the form."""
    state = st.session_state
    data = {"data": {"dataset": state.get(f"{prefix}_dataset", "digits")}}
    head = state.get(f"{prefix}_head", "loss_attention")
    return preset_settings(name, preset_context(data, {"head": head}))


def _form_fields(prefix: str, fields) -> dict[str, str]:
    return {path: f"{prefix}_{FORM_FIELDS[path]}" for path in fields}


def write_preset_into_form(prefix: str, name: str, fields=tuple(FORM_FIELDS),
                           keep_given: bool = False) -> None:
    """The preset's values into the form's fields (those of ``fields`` the form has);
    ``keep_given``: not over values the session already holds (a link's or a test's)."""
    keys = _form_fields(prefix, fields)
    for path, setting in _preset_of_form(prefix, name).items():
        if path in keys and not (keep_given and keys[path] in st.session_state):
            st.session_state[keys[path]] = setting.value


def first_visit_preset(prefix: str, fields=tuple(FORM_FIELDS)) -> None:
    """On the first visit the form shows the default data set's own preset (the digits: live,
    a run short enough to train during a lesson on a CPU) and its whole test set."""
    if f"{prefix}_preset" in st.session_state:
        return
    name = dataset_spec(st.session_state.get(f"{prefix}_dataset", "digits")).default_preset or ""
    st.session_state[f"{prefix}_preset"] = name
    st.session_state.setdefault(f"{prefix}_test_size", 0)
    if name:
        write_preset_into_form(prefix, name, fields, keep_given=True)


def preset_picker(prefix: str, fields=tuple(FORM_FIELDS), given=()) -> str:
    """The preset select. Choosing one writes its values into the form's own fields
    (``fields``), so the form shows what will run (and may still be edited: the form's
    values win); what else it sets is listed under it (the reasons in its help), except the
    fields the page sets otherwise (``given``: a sweep's grid)."""
    kwargs = keep(f"{prefix}_preset", "", PRESET_CHOICES)
    remember_choice = kwargs["on_change"]

    def show_in_form() -> None:
        remember_choice()
        name = st.session_state[f"{prefix}_preset"]
        if name:
            write_preset_into_form(prefix, name, fields)

    shown = ", ".join(FORM_FIELDS[f].replace("_", " ") for f in fields)
    rest = _preset_rest(prefix, st.session_state[f"{prefix}_preset"], fields, given)
    why = "".join(f"\n- `{path} = {setting.value}`: {setting.reason}"
                  for path, setting in rest.items())
    name = st.selectbox("Preset", PRESET_CHOICES, format_func=preset_label,
                        **{**kwargs, "on_change": show_in_form},
                        help=f"Fills the form's {shown}, and sets what the form has no field "
                             "for (threshold denominator, stem, learning rate, ramp-up). "
                             "Values you then type in the form win."
                             + (f"\n\nWhy it sets the rest:{why}" if why else ""))
    if name:
        # The values only, in a line or two: the reasons (a paragraph) are in the help above,
        # so that the Launch button stays on a 1366x768 screen.
        st.caption(f"**{name}** also sets: " + ", ".join(
            f"`{path} = {setting.value}`" for path, setting in rest.items()) + " (the ? above "
            "says why)")
    return name


def _preset_rest(prefix: str, name: str, fields, given) -> dict:
    """What preset ``name`` sets beyond the form's ``fields`` and the page's ``given``."""
    if not name:
        return {}
    return {k: v for k, v in _preset_of_form(prefix, name).items()
            if k not in fields and k not in given}


def run_settings(prefix: str, *, heads: bool = True, gamma_xi: bool = True,
                 backbone: bool = True, folder: bool = True) -> dict:
    """Draw the settings (inside the caller's form) and return them as a RunConfig dict.
    ``backbone`` / ``heads`` False: the caller picks the model(s) itself; ``folder`` False:
    the caller draws the data folder (:func:`with_data_folder`) where it wants it."""
    datasets, backbones = list_datasets(), list_backbones()
    c1, c2, c3 = st.columns(3)
    data = {"dataset": c1.selectbox("Data set", datasets,
                                    **keep(f"{prefix}_dataset", "digits", datasets))}
    model = {}
    if backbone:
        model["backbone"] = c2.selectbox("Backbone", backbones,
                                         **keep(f"{prefix}_backbone", "small_cnn", backbones))
    if heads:
        names = list_heads()
        model["head"] = c3.selectbox("Head", names, format_func=lambda h: head_spec(h).label,
                                     **keep(f"{prefix}_head", "loss_attention", names))
    loss, train = {}, {}
    c1, c2, c3, c4 = st.columns(4)
    if gamma_xi:
        loss["gamma_max"] = c1.number_input("γmax", 0.0, 10.0, step=0.05, format="%.3f",
                                            **keep(f"{prefix}_gamma", 0.1))
        model["xi"] = c2.number_input("ξ", 0.0, 1.0, step=0.05, format="%.2f",
                                      **keep(f"{prefix}_xi", 0.1))
    train["epochs"] = int(c3.number_input("Epochs", 1, 1000, step=1,
                                          **keep(f"{prefix}_epochs", 5)))
    train["batch_size"] = int(c4.number_input("Batch", 1, 4096, step=16,
                                              **keep(f"{prefix}_batch", 128)))
    c1, c2, c3, c4 = st.columns(4)
    train_size = int(c1.number_input("Train images (0: all)", 0, 10_000_000, step=1000,
                                     **keep(f"{prefix}_train_size", 4000)))
    test_size = int(c2.number_input("Test images (0: all)", 0, 10_000_000, step=500,
                                    **keep(f"{prefix}_test_size", 1000)))
    data.update(train_size=train_size or None, test_size=test_size or None)
    train["device"] = c3.selectbox("Device", DEVICE_CHOICES,
                                   **keep(f"{prefix}_device", "auto", DEVICE_CHOICES))
    train["seed"] = int(c4.number_input("Seed", 0, 2**31 - 1, step=1,
                                        **keep(f"{prefix}_seed", 0)))
    settings = {"model": model, "data": data, "loss": loss, "train": train}
    return with_data_folder(settings, prefix) if folder else settings


def with_data_folder(settings: dict, prefix: str, columns=None) -> dict:
    """:func:`data_folder_picker`'s choice into ``settings`` (from :func:`run_settings`): the
    folder as the data root, or the refusal as its ``problem`` (launching is refused with it).
    ``columns``: two column containers to draw into (the picker's own row otherwise)."""
    root, problem = data_folder_picker(prefix, columns=columns)
    if problem:
        settings["problem"] = problem
    elif root is not None:
        settings["data"]["root"] = str(root)
    return settings


DEFAULT_ROOT = "default (search every data root)"


def data_folder_picker(prefix: str, label: str = "Data folder", columns=None
                       ) -> tuple[Path | None, str | None]:
    """A folder inside one of the data roots (engine.roots): never any other path of the
    server. Returns (folder, None); (None, None) for the default search (the engine then looks
    in $LOSSATTN_DATA and ./data); (None, message) for a sub-folder outside its root, the
    message also shown at the field. ``columns``: the two column containers to draw the root
    and the sub-folder into (a row of their own otherwise)."""
    roots = data_roots()
    labels = [DEFAULT_ROOT, *[r.label for r in roots]]
    c1, c2 = columns or st.columns([1, 2])
    choice = c1.selectbox(f"{label}: root", labels, **keep(f"{prefix}_root", DEFAULT_ROOT, labels),
                          help="Data is read only inside the data roots: $LOSSATTN_DATA, ./data "
                               "and the folders in $LOSSATTN_DATA_ROOTS.")
    sub = c2.text_input("Sub-folder (optional)", **keep(f"{prefix}_sub", ""),
                        disabled=choice == DEFAULT_ROOT,
                        help="A folder inside the chosen root (none: the root itself)")
    if not roots:
        st.caption("No data root exists yet: set LOSSATTN_DATA (or LOSSATTN_DATA_ROOTS), or "
                   "make ./data. The embedded digits need none.")
    if choice == DEFAULT_ROOT:
        return None, None
    root = next(r for r in roots if r.label == choice)
    try:
        return folder_in_root(root, sub), None
    except DataError as exc:
        st.error(shown_relative(str(exc)))
        return None, str(exc)


def config_of(settings: dict, name: str | None = None, tags: tuple[str, ...] = (),
              preset: str | None = None) -> RunConfig:
    """A validated RunConfig (ConfigError names the bad field). ``preset`` fills the fields
    the settings do not give (engine.presets); the form's own values win."""
    if settings.get("problem"):
        raise ConfigError(settings["problem"])
    sections = {k: v for k, v in settings.items() if k != "problem"}
    data = {**sections, "name": name or None, "tags": list(tags), "preset": preset}
    return config_from_dict(RunConfig, fill_preset(data))


def queue_note(folder) -> str:
    """Where a queued job stands: its place, and what it waits for."""
    from engine.jobs import queue_place
    from engine.slots import job_limit

    place = queue_place(folder)
    where = f"place {place[0]} of {place[1]} in the queue" if place else "in the queue"
    return (f"queued: {where}; it starts when one of the {job_limit()} job(s) computing now "
            "ends (LOSSATTN_MAX_JOBS)")


def progress_of(run: Run, status: Status) -> tuple[float, str]:
    """(fraction done, a line of text) from a run's status (read once by the caller)."""
    if status.state == State.QUEUED:
        return 0.0, queue_note(run.path)
    progress = status.fields
    epochs = progress.get("epochs") or run.config().train.epochs
    done = progress.get("epochs_done") or 0
    steps, step = progress.get("steps") or 0, progress.get("step") or 0
    fraction = min(1.0, (done + (step / steps if steps else 0)) / max(epochs, 1))
    state = status.state or "?"
    running = state == State.RUNNING
    text = f"{state}: epoch {min(done + 1, epochs) if running else done}/{epochs}"
    if running and steps:
        text += f", step {step}/{steps}"
    if progress.get("images_per_s"):
        text += f", {progress['images_per_s']:.0f} img/s"
    if running and progress.get("eta_s") is not None:
        text += f", ETA {format_seconds(progress['eta_s'])}"
    if progress.get("best_metric") is not None:
        text += f"; best {progress.get('metric_name', 'metric')} {progress['best_metric']:.4f}"
    return fraction, text


def show_job_end(status: Status, what: str, after_stop: str = "", finished: str = "") -> None:
    """The message for a background job that has ended (every job has one status schema:
    engine.job_status); nothing while it is active."""
    state, reason = status.state, status.reason
    if state == State.FAILED:
        st.error(f"{what} failed: {reason or 'see the log'}")
    elif state == State.STOPPED:
        st.info(f"{what} stopped ({reason or 'on request'}). {after_stop}".strip())
    elif state == State.FINISHED:
        st.success(f"{what} finished{finished}.")


def eta_text(started: float | None, fraction: float, now: float) -> str:
    """The time left of a job, measured: the time so far times what is left over what is done
    (no promise before a first part is done)."""
    if not started or fraction <= 0.02:
        return "; time left: measured once a first part is done"
    elapsed = now - float(started)
    left = format_seconds(elapsed * (1 - fraction) / fraction)
    return f"; about {left} left ({format_seconds(elapsed)} so far)"


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return time.strftime("%H:%M:%S", time.gmtime(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
