"""Watching runs and jobs from the pages: the store's queue, and the way from a run to its model.

The pages that launch or list runs and jobs (Train, Runs, Sweep, MIL, Stride) start what the
store's queue holds whenever they look at their jobs (:func:`look_at_queue`: a killed job cannot
start the next itself), and offer to open a run's best checkpoint in the Patch Explorer
(:func:`explorable`, :func:`explore_run`). Built on the run store of :mod:`ui.st_models` and the
remembered choices of :mod:`ui.st_session`.
"""

from __future__ import annotations

import streamlit as st

from engine.runs import Run
from ui.st_models import store
from ui.st_session import MODEL_KEY, remember


def look_at_queue() -> None:
    """Start what the store's queue holds for the slots that are free: a job that ends starts
    the next itself, but a killed one cannot (engine.jobs.dispatch; cheap when none waits)."""
    from engine.jobs import dispatch

    dispatch(store().root)


def explore_run(name: str) -> None:
    """Open the Patch Explorer on a run's best checkpoint, at its first test image."""
    remember(MODEL_KEY, f"run: {name}")
    for key, value in [("ex_source", "test set"), ("ex_outcome", "all"), ("ex_true", "any"),
                       ("ex_pred", "any"), ("ex_pos", 0)]:
        remember(key, value)
    st.switch_page("pages/explorer.py")


def explorable(run: Run) -> bool:
    """Whether a run has a checkpoint the Explorer can open (a patch head's best)."""
    if not run.best_checkpoint.is_file():
        return False
    try:
        return run.config().model.head != "plain"
    except (OSError, ValueError):
        return False
