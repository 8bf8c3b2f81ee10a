"""Train: launch a run in the background and watch it live; stop and resume it.

Training never runs in this script: :func:`engine.launch.launch` starts its own process, which goes
on when the tab closes. The live panel is a fragment that re-reads the run's files every second.
"""

import streamlit as st

from engine import launch
from engine.jobs import ACTIVE, LIVE, State
from engine.metric_table import main_metric
from engine.safe_io import read_tail
from ui.figures import training_curves
from ui.st_forms import (
    config_of,
    first_visit_preset,
    preset_picker,
    progress_of,
    queue_note,
    run_settings,
    show_job_end,
    with_data_folder,
)
from ui.st_guards import guard
from ui.st_links import ensure_router
from ui.st_models import store
from ui.st_session import keep, remember
from ui.st_watch import explorable, explore_run, look_at_queue

LIVE_KEY = "tr_watch"  # the run the live panel shows; a new launch takes it over


def launch_form() -> None:
    first_visit_preset("tr")
    with st.container(border=True):  # no st.form: its widgets could not remember values
        preset = preset_picker("tr")
        settings = run_settings("tr", folder=False)
        # The data folder, the name and the button share a row, so that the button is on the
        # first screen at 1366x768; the root's column is wide enough for its longest choice.
        c1, c2, c3, c4 = st.columns([1.6, 0.9, 1.1, 0.9], vertical_alignment="bottom")
        settings = with_data_folder(settings, "tr", (c1, c2))
        name = c3.text_input("Run name (empty: automatic)", **keep("tr_name", ""))
        submitted = c4.button("Launch training", type="primary", key="tr_launch",
                              width="stretch")
    if submitted:
        with guard("Launching", stop=False):
            config = config_of(settings, name.strip() or None, preset=preset or None)
            run = launch.launch(store(), config)
            remember(LIVE_KEY, run.name)
            if run.status().state == State.QUEUED:
                st.info(f"Run {run.name} is {queue_note(run.path)}.")
            else:
                st.success(f"Run {run.name} started in the background.")


@st.fragment(run_every=1.0)
def live_panel(name: str) -> None:
    with guard("The live view", stop=False):
        look_at_queue()
        if not store().exists(name):
            st.warning(f"Run {name} no longer exists (deleted).")
            return
        run = store().get(name)
        status = run.status()
        state = status.state
        fraction, text = progress_of(run, status)
        st.progress(fraction, text=text)
        show_job_end(status, f"Run {name}", "Resume continues the same curves.",
                     f" in {status.fields.get('duration_s') or 0:.0f} s")
        c1, c2, c3, _ = st.columns([1, 1, 1.6, 2.4])
        if c1.button("Stop", disabled=state not in LIVE, key="tr_stop"):
            store().stop(name)
            st.toast(f"{name} is out of the queue: it never started." if state == State.QUEUED
                     else f"Stopping {name}: it checkpoints and stops after the current step.")
        if c2.button("Resume", disabled=state not in (State.STOPPED, State.FAILED),
                     key="tr_resume"):
            launch.resume(store(), name)
            st.toast(f"Resumed {name}.")
        if c3.button("Explore this run", type="primary" if state == State.FINISHED else "secondary",
                     disabled=state in ACTIVE or not explorable(run), key="tr_explore",
                     help="Open its best checkpoint in the Patch Explorer"):
            explore_run(name)
        metrics = run.metrics()
        if metrics:
            metric = main_metric(run.config().loss.multilabel)
            st.plotly_chart(training_curves(metrics, metric), key=f"tr_curves_{name}")
        with st.expander("Log"):
            st.code(run.last_output_line() if state == State.FAILED else _tail(run), language=None)


def _tail(run, lines: int = 15) -> str:
    """The log's last lines: only its end is read, whatever its size."""
    try:
        return "\n".join(read_tail(run.log_path, "a run log").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log yet)"
    except OSError as exc:
        return f"(log unreadable: {exc})"


ensure_router()
st.title("Train")
launch_form()
st.divider()
with guard("The run list"):
    rows = store().list()
    names = [r["name"] for r in sorted(rows, key=lambda r: r.get("created") or 0, reverse=True)]
    if not names:
        st.info("No runs yet. Launch one above; it trains in the background.")
        st.stop()
    name = st.selectbox("Watch run", names, **keep(LIVE_KEY, names[0], names))
live_panel(name)
