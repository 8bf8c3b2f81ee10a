"""The run-settings form shared by Train, Sweep and Stride / time, and run-status widgets."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from engine.config import ConfigError, RunConfig, config_from_dict
from engine.data import DataError, list_datasets
from engine.data.roots import data_roots, folder_in_root, shown_relative
from engine.device import DEVICE_CHOICES
from engine.models import head_spec, list_backbones, list_heads
from engine.preset_fill import fill_preset
from engine.runs import Run
from ui.st_state import keep


def run_settings(prefix: str, *, heads: bool = True, gamma_xi: bool = True,
                 backbone: bool = True) -> dict:
    """Draw the settings (inside the caller's form) and return them as a RunConfig dict.
    ``backbone`` / ``heads`` False: the caller picks the model(s) itself."""
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
    root, problem = data_folder_picker(prefix)
    if problem:
        settings["problem"] = problem  # launching is refused with it
    elif root is not None:
        data["root"] = str(root)
    return settings


DEFAULT_ROOT = "default (search every data root)"


def data_folder_picker(prefix: str, label: str = "Data folder") -> tuple[Path | None, str | None]:
    """A folder inside one of the data roots (engine.data.roots): never any other path of the
    server. Returns (folder, None); (None, None) for the default search (the engine then looks
    in $LOSSATTN_DATA and ./data); (None, message) for a sub-folder outside its root, the
    message also shown at the field."""
    roots = data_roots()
    labels = [DEFAULT_ROOT, *[r.label for r in roots]]
    c1, c2 = st.columns([1, 2])
    choice = c1.selectbox(f"{label}: root", labels, **keep(f"{prefix}_root", DEFAULT_ROOT, labels),
                          help="Data is read only inside the data roots: $LOSSATTN_DATA, ./data "
                               "and the folders in $LOSSATTN_DATA_ROOTS.")
    sub = c2.text_input("Sub-folder inside the root (optional)", **keep(f"{prefix}_sub", ""),
                        disabled=choice == DEFAULT_ROOT)
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


def progress_of(run: Run, status: dict) -> tuple[float, str]:
    """(fraction done, a line of text) from a run's status (read once by the caller)."""
    epochs = status.get("epochs") or run.config().train.epochs
    done = status.get("epochs_done") or 0
    steps, step = status.get("steps") or 0, status.get("step") or 0
    fraction = min(1.0, (done + (step / steps if steps else 0)) / max(epochs, 1))
    state = status.get("state", "?")
    text = f"{state}: epoch {min(done + 1, epochs) if state == 'running' else done}/{epochs}"
    if state == "running" and steps:
        text += f", step {step}/{steps}"
    if status.get("images_per_s"):
        text += f", {status['images_per_s']:.0f} img/s"
    if state == "running" and status.get("eta_s") is not None:
        text += f", ETA {format_seconds(status['eta_s'])}"
    if status.get("best_metric") is not None:
        text += f"; best {status.get('metric_name', 'metric')} {status['best_metric']:.4f}"
    return fraction, text


def show_job_end(status: dict, what: str, after_stop: str = "", finished: str = "") -> None:
    """The message for a background job that has ended (every job has one status schema:
    engine.jobs); nothing while it is active."""
    state, reason = status.get("state"), status.get("reason") or ""
    if state == "failed":
        st.error(f"{what} failed: {reason or 'see the log'}")
    elif state == "stopped":
        st.info(f"{what} stopped ({reason or 'on request'}). {after_stop}".strip())
    elif state == "finished":
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
