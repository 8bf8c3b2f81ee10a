"""Train: launch a run in the background and watch it live; stop and resume it.

Training never runs in this script: :func:`engine.launch.launch` starts its own process, which goes
on when the tab closes. The live panel is a fragment that re-reads the run's files every second.
"""

import streamlit as st

from engine import launch
from engine.data.registry import dataset_spec
from engine.jobs import ACTIVE
from engine.metric_table import main_metric
from engine.preset_fill import preset_context
from engine.presets import PRESETS, preset_settings
from ui.figures import training_curves
from ui.st_forms import config_of, progress_of, run_settings, show_job_end
from ui.st_state import ensure_router, explorable, explore_run, guard, keep, remember, store

LIVE_KEY = "tr_watch"  # the run the live panel shows; a new launch takes it over
PRESET_CHOICES = ["", *PRESETS]  # "": no preset, the recipe defaults
# Preset settings that this form has fields for (section.field -> the field's state key); a
# comment, not a string: Streamlit would draw a bare string on the page.
FORM_FIELDS = {"model.xi": "tr_xi", "loss.gamma_max": "tr_gamma", "train.epochs": "tr_epochs",
               "train.batch_size": "tr_batch", "data.train_size": "tr_train_size"}


def _preset_label(name: str) -> str:
    return f"{name}: {PRESETS[name].description}" if name else "none (recipe defaults)"


def _preset_of_form(name: str) -> dict:
    """What preset ``name`` sets for the head and data set now chosen in the form."""
    state = st.session_state
    data = {"data": {"dataset": state.get("tr_dataset", "digits")}}
    return preset_settings(name, preset_context(data, {"head": state.get("tr_head",
                                                                          "loss_attention")}))


def _write_preset_into_form(name: str, keep_given: bool = False) -> None:
    """The preset's values into the form's fields; ``keep_given``: not over values the session
    already holds (a link's or a test's)."""
    for path, setting in _preset_of_form(name).items():
        if path in FORM_FIELDS and not (keep_given and FORM_FIELDS[path] in st.session_state):
            st.session_state[FORM_FIELDS[path]] = setting.value


def _first_visit_defaults() -> None:
    """On the first visit the form shows the default data set's own preset (the digits: live,
    a run short enough to train during a lesson on a CPU) and its whole test set."""
    if "tr_preset" in st.session_state:
        return
    name = dataset_spec(st.session_state.get("tr_dataset", "digits")).default_preset or ""
    st.session_state["tr_preset"] = name
    st.session_state.setdefault("tr_test_size", 0)
    if name:
        _write_preset_into_form(name, keep_given=True)


def _preset_picker() -> str:
    """The preset select. Choosing one writes its values into the form's own fields, so the
    form shows what will run (and may still be edited: the form's values win)."""
    kwargs = keep("tr_preset", "", PRESET_CHOICES)
    remember_choice = kwargs["on_change"]

    def show_in_form() -> None:
        remember_choice()
        name = st.session_state["tr_preset"]
        if name:
            _write_preset_into_form(name)

    name = st.selectbox("Preset", PRESET_CHOICES, format_func=_preset_label,
                        **{**kwargs, "on_change": show_in_form},
                        help="Fills the form's ξ, γmax, epochs, batch and train images, and "
                             "sets what the form has no field for (threshold denominator, "
                             "stem, learning rate, ramp-up). Values you then type in the form "
                             "win.")
    if name:
        rest = {k: v for k, v in _preset_of_form(name).items() if k not in FORM_FIELDS}
        st.caption(f"**{name}** also sets: " + "; ".join(
            f"`{path} = {setting.value}` ({setting.reason})" for path, setting in rest.items()))
    return name


def launch_form() -> None:
    _first_visit_defaults()
    with st.container(border=True):  # no st.form: its widgets could not remember values
        preset = _preset_picker()
        settings = run_settings("tr")
        name = st.text_input("Run name (empty: automatic)", **keep("tr_name", ""))
        submitted = st.button("Launch training", type="primary", key="tr_launch")
    if submitted:
        with guard("Launching", stop=False):
            config = config_of(settings, name.strip() or None, preset=preset or None)
            run = launch.launch(store(), config)
            remember(LIVE_KEY, run.name)
            st.success(f"Run {run.name} started in the background.")


@st.fragment(run_every=1.0)
def live_panel(name: str) -> None:
    with guard("The live view", stop=False):
        if not store().exists(name):
            st.warning(f"Run {name} no longer exists (deleted).")
            return
        run = store().get(name)
        status = run.status()
        state = status.get("state")
        fraction, text = progress_of(run, status)
        st.progress(fraction, text=text)
        show_job_end(status, f"Run {name}", "Resume continues the same curves.",
                     f" in {status.get('duration_s') or 0:.0f} s")
        c1, c2, c3, _ = st.columns([1, 1, 1.6, 2.4])
        if c1.button("Stop", disabled=state not in ACTIVE, key="tr_stop"):
            store().stop(name)
            st.toast(f"Stopping {name}: it checkpoints and stops after the current step.")
        if c2.button("Resume", disabled=state not in ("stopped", "failed"), key="tr_resume"):
            launch.resume(store(), name)
            st.toast(f"Resumed {name}.")
        if c3.button("Explore this run", type="primary" if state == "finished" else "secondary",
                     disabled=state in ACTIVE or not explorable(run), key="tr_explore",
                     help="Open its best checkpoint in the Patch Explorer"):
            explore_run(name)
        metrics = run.metrics()
        if metrics:
            metric = main_metric(run.config().loss.multilabel)
            st.plotly_chart(training_curves(metrics, metric), key=f"tr_curves_{name}")
        with st.expander("Log"):
            st.code(run.last_output_line() if state == "failed" else _tail(run), language=None)


def _tail(run, lines: int = 15) -> str:
    try:
        return "\n".join(run.log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log yet)"


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
