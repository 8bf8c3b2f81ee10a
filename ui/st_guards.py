"""Errors for people, and the guard on torch's thread count.

:func:`guard` turns an error inside a page's block into a message (never a traceback) and stops
the page; :func:`single_threaded` runs tiny tensor work on one thread without leaving other
sessions at one. Both protect a page from what goes wrong around it, and both are used by every
explaining page; the lock and the remembered thread count below exist once, here. Imports no
other ``ui`` module.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import streamlit as st

log = logging.getLogger("lossattn.app")


@contextlib.contextmanager
def guard(what: str = "This page", stop: bool = True):
    """Show an error as a message, never a traceback, then stop the page (``st.stop()``), so
    that no later line runs without what the guarded block was to produce. ``stop=False``
    for a self-contained block (a launch form, one item of a loop, a fragment).

    Expected errors (a bad value, a missing file, an unusable checkpoint: every engine error is
    a ValueError) show their own message; anything else is logged with its traceback on the
    server and summarised on the page. Paths inside the data roots are shown relative to them."""
    try:
        yield
    except ValueError as exc:
        st.error(_relative(str(exc)))
    except Exception as exc:  # anything unforeseen: a message here, the traceback in the log
        log.exception("%s failed", what)
        st.error(f"{what} hit a problem: {exc.__class__.__name__}: {_relative(str(exc))}")
    else:
        return
    if stop:
        st.stop()


def _relative(text: str) -> str:
    from engine.roots import shown_relative

    return shown_relative(text)


_ONE_THREAD = threading.Lock()
_default_threads: int | None = None  # torch's threads before any session took them down to 1


@contextlib.contextmanager
def single_threaded():
    """Run tiny tensor work (re-decoding cached patch logits on a slider move) on one thread.

    On a busy machine (a run training beside the app) two OpenMP threads make a 1 ms op take
    10-20 ms while they wait for a core; one thread does not wait.

    ``torch.set_num_threads`` sets the calling thread's count and the default of threads
    started later (Streamlit starts one per script run). So each session sets 1 for itself
    and then restores the process's count as first seen here, never one it read while
    another session was inside: saving and restoring its own left every later run at 1
    thread when two overlapped."""
    global _default_threads
    import torch

    with _ONE_THREAD:  # the first two sessions in must not both read the default
        if _default_threads is None:
            _default_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(_default_threads)
