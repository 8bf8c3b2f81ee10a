"""The URL: app.py's router and the Explorer's view in a link (?model=...&image=...&xi=...).

A link opened first, or a reload, must land on the router (:func:`ensure_router`), choose its
model before the sidebar draws (:func:`adopt_link`) and hand the page its own parameters once
(:func:`take_link`); the page writes its view back (:func:`write_link`). Its session keys live
here; the remembered choices under them come from :mod:`ui.st_session`, and the model a link
names is looked up among :func:`ui.st_models.model_sources`, which is why this sits apart from,
and above, both.
"""

from __future__ import annotations

import streamlit as st

from ui.st_models import model_sources
from ui.st_session import MODEL_KEY, remember, remembered

ROUTED_KEY = "_app_router_ran"
LINK_KEY = "_link_seen"  # the query string this session last read or wrote


def router_ran() -> None:
    """app.py's mark: this session has run the router (see :func:`ensure_router`)."""
    st.session_state[ROUTED_KEY] = True


def ensure_router() -> None:
    """Run app.py's navigation even when a link opens a page first.

    Streamlit finds the ``pages/`` folder and, until some session has run app.py's
    ``st.navigation`` on this server, runs a page's URL as that page's script alone (its legacy
    multipage mode): no sidebar model choice, no wide layout, no link adoption, for every
    session that opens a link or reloads a page before anyone opened the root. Called first on
    every page: in a session that has never run app.py, it switches the server to the router
    (what ``st.navigation`` itself does) and reruns, and app.py then opens the same URL. Only
    then: a rerun drops the button clicks of the run it replaces, and Streamlit's test harness
    puts every run back in the legacy mode."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory and not st.session_state.get(ROUTED_KEY):
        PagesManager.uses_pages_directory = False
        st.rerun()


def link_value(label: str) -> str:
    """A model source label as it appears in a link: the shipped file's stem, or run/NAME."""
    return label.removeprefix("shipped: ").replace("run: ", "run/", 1)


def label_of_link(value: str, labels) -> str | None:
    return next((label for label in labels if link_value(label) == value), None)


def adopt_link() -> dict[str, str]:
    """The query parameters a link (or a reload) brought, once: the model is chosen here,
    before the sidebar draws; the page takes the rest (its own keys) from the returned dict.
    Parameters this session wrote itself (:func:`write_link`) are not adopted again, so a
    later filter change is never undone by the URL."""
    params = {k: st.query_params[k] for k in st.query_params}
    if not params or params == remembered(LINK_KEY):
        return {}
    remember(LINK_KEY, params)
    model = params.get("model")
    if model is not None:
        label = label_of_link(model, model_sources())
        if label is None:
            st.warning(f"The link's model {model!r} is not here (deleted run?); showing "
                       "the default model.")
        else:
            remember(MODEL_KEY, label)
    remember("_link_pending", params)
    return params


def take_link() -> dict[str, str]:
    """The adopted link's parameters, for the page that reads them (once)."""
    return st.session_state.pop("_link_pending", {}) or {}


def write_link(**values) -> None:
    """Put the current view in the URL, so that copying it or reloading reopens it."""
    params = {k: str(v) for k, v in values.items()}
    remember(LINK_KEY, params)
    if {k: st.query_params.get(k) for k in params} != params or len(st.query_params) != len(
            params):
        st.query_params.from_dict(params)
