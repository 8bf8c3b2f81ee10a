"""Choices that survive page changes: the session keys every page reads and writes.

Streamlit drops a widget's key when the user leaves its page, so a choice that must survive a
page change is kept under a plain session key and copied into the widget each time it is drawn
(:func:`keep`). This is the bottom of the app's Streamlit services: it imports no other ``ui``
module, so the model, link and run modules can all build on it.
"""

from __future__ import annotations

import streamlit as st

MODEL_KEY = "model_source"  # the model every explaining page works on


def keep(key: str, default, options=None, low=None, high=None):
    """Widget kwargs ``key=..., on_change=...`` whose value lives on under ``key`` after the
    widget's own key (``w_<key>``) is dropped. Use: ``st.slider(..., **keep("xi", 0.1))``.

    A remembered value that the widget can no longer take (not among ``options``, or outside
    ``low``..``high``, e.g. after switching to a model with other classes) falls back to the
    default or is clamped, instead of failing."""
    widget = f"w_{key}"
    value = st.session_state.get(key, default)
    if options is not None and isinstance(value, list):  # a multiselect keeps what still exists
        value = [v for v in value if v in options]
    elif options is not None and value not in options:
        value = default
    if low is not None and value < low:
        value = low
    if high is not None and value > high:
        value = high
    st.session_state[key] = value
    st.session_state[widget] = st.session_state[key]

    def copy_back() -> None:
        st.session_state[key] = st.session_state[widget]

    return {"key": widget, "on_change": copy_back}


def remembered(key: str, default=None):
    return st.session_state.get(key, default)


def remember(key: str, value) -> None:
    st.session_state[key] = value
