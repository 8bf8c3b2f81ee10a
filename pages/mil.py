"""MIL: cross-validate Loss-Attention and the attention baselines on multiple-instance data (the
AAAI 2020 table), in the background, and browse the instance weights of every test bag."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from engine.jobs import ACTIVE, State
from engine.mil.config import EPOCH_CHOICES, INSTANCE_LOSSES, MilConfig
from engine.mil.data import EMBEDDED, available_mil_datasets
from engine.mil.experiment import (
    experiment_status,
    list_experiments,
    mil_root,
    start_experiment,
    stop_experiment,
)
from engine.mil.models import MIL_METHODS
from engine.mil.paper import PAPER_ACCURACY
from engine.mil.results import TEST_MAX, read_bag_weights, read_results, table_rows
from engine.runs import default_runs_root
from ui.figures import bag_weights_figure
from ui.st_forms import data_folder_picker, eta_text, queue_note, show_job_end
from ui.st_guards import guard
from ui.st_links import ensure_router
from ui.st_session import keep
from ui.st_watch import look_at_queue

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = PROJECT_ROOT / "results" / "mil"
SHIPPED_SUFFIX = " (shipped with the repository)"
EPOCH_CHOICE_LABELS = {
    "validation": "validation split (early stopping)",
    "inner_cv": "inner CV on the training folds (3.6x slower)",
}
INSTANCE_LOSS_LABELS = {"sum": "sum (the paper's Eq. 7)", "mean": "mean (the released code)"}
HONEST_NOTE = (
    "**Measured** is the headline: each fold's epoch is chosen without looking at its test fold. "
    f"**{TEST_MAX}** is the best test accuracy over the same epochs, the rule of the released "
    "AAAI code (`np.amax` over per-epoch test accuracies): it picks the epoch on the test fold, "
    "so it is biased upwards, and is shown only to measure that bias.")


def runs_root() -> Path:
    return default_runs_root().resolve()


# ----------------------------------------------------------------------------------------------
# Launch


def launch_form() -> None:
    with st.container(border=True):
        root, problem = data_folder_picker("mil", "Data folder (holding mil/musk1/...)")
        available = available_mil_datasets(root)
        if available == [EMBEDDED]:
            st.caption("Only the embedded digit bags are available: pick a data root with "
                       "mil/musk1/X.mat, Bag2.mat, BagI.mat, ... (or set LOSSATTN_DATA).")
        c1, c2 = st.columns(2)
        datasets = c1.multiselect("Data sets", available,
                                  **keep("mil_datasets", [EMBEDDED], available))
        methods = c2.multiselect("Methods", list(MIL_METHODS),
                                 format_func=lambda m: MIL_METHODS[m].label,
                                 **keep("mil_methods", ["loss_attention"], list(MIL_METHODS)))
        c1, c2, c3, c4 = st.columns(4)
        folds = c1.number_input("Folds", 2, 20, **keep("mil_folds", 10, low=2, high=20))
        repeats = c2.number_input("Repetitions", 1, 10, **keep("mil_repeats", 5, low=1, high=10))
        epochs = c3.number_input("Most epochs", 1, 500,
                                 **keep("mil_epochs", MilConfig.epochs, low=1, high=500))
        name = c4.text_input("Experiment name", **keep("mil_name",
                                                       time.strftime("mil-%Y%m%d-%H%M%S")))
        c1, c2, c3 = st.columns([2, 2, 1.4])
        epoch_choice = c1.selectbox("Epoch chosen by", EPOCH_CHOICES,
                                    format_func=EPOCH_CHOICE_LABELS.get,
                                    **keep("mil_epoch_choice", "validation", EPOCH_CHOICES))
        instance_loss = c2.selectbox("Instance loss over a bag", INSTANCE_LOSSES,
                                     format_func=INSTANCE_LOSS_LABELS.get,
                                     **keep("mil_instance_loss", "sum", INSTANCE_LOSSES))
        test_max = c3.checkbox("Test-max column", **keep("mil_test_max", True),
                               help="The released code's rule, for comparison only; it never "
                                    "influences training or the epoch choice.")
        start = st.button("Start cross-validation", type="primary", key="mil_start")
    if start:
        with guard("Starting the experiment", stop=False):
            if problem:
                raise ValueError(problem)
            if not datasets or not methods:
                raise ValueError("Pick at least one data set and one method.")
            config = MilConfig(folds=int(folds), repeats=int(repeats), epochs=int(epochs),
                               epoch_choice=epoch_choice, instance_loss=instance_loss,
                               report_test_max=bool(test_max))
            start_experiment(runs_root(), name.strip(), datasets, methods, config,
                             data_root=str(root) if root else None)
            st.session_state["mil_experiment"] = name.strip()
            st.success(f"Started {name.strip()}: {len(datasets) * len(methods)} cross-validations "
                       "in the background; progress below.")


# ----------------------------------------------------------------------------------------------
# Progress and results


def shipped_choices() -> dict[str, Path]:
    """The result folders shipped in results/mil (the headline and its variants), by label."""
    if not SHIPPED.is_dir():
        return {}
    folders = [SHIPPED] + sorted(p for p in SHIPPED.iterdir()
                                 if p.is_dir() and (p / "results.json").is_file())
    return {f"{p.relative_to(PROJECT_ROOT).as_posix()}{SHIPPED_SUFFIX}": p for p in folders}


@st.fragment(run_every=2.0)
def progress(folder: Path) -> None:
    with guard("Reading the progress", stop=False):
        status = experiment_status(folder)
        state = status.state
        if status.missing:
            return
        fraction = float(status.fields.get("fraction") or 0.0)
        if state == State.QUEUED:
            look_at_queue()
            st.progress(0.0, text=queue_note(folder))
            if st.button("Stop", key="mil_stop"):
                stop_experiment(folder)
                st.rerun(scope="app")
        elif state in ACTIVE:
            current = status.fields.get("current") or "starting"
            st.progress(min(1.0, fraction), text=f"{fraction:.0%} - {current} "
                        f"({status.fields.get('task', 0) + 1}/{status.fields.get('tasks', '?')})"
                        + eta_text(status.started, fraction, time.time()))
            if st.button("Stop", key="mil_stop"):
                stop_experiment(folder)
                st.rerun(scope="app")
        else:
            show_job_end(status, "The experiment", f"It had done {fraction:.0%}.",
                         f" in {status.fields.get('seconds', '?')} s")
        seen = st.session_state.setdefault("mil_seen", {})
        key = str(folder)
        mark = (state, status.fields.get("task"))
        if seen.get(key, mark) != mark:  # a cross-validation finished: redraw the table
            seen[key] = mark
            st.rerun(scope="app")
        seen[key] = mark


def paper_table() -> list[dict]:
    rows = []
    for method, by_set in PAPER_ACCURACY.items():
        row = {"method": method}
        for dataset, (mean, std) in by_set.items():
            row[dataset] = f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"
        rows.append(row)
    return rows


def results(rows: list[dict]) -> None:
    st.markdown("**Measured** (accuracy, mean ± std over all test folds), with the paper's")
    if rows:
        st.dataframe(table_rows(rows), hide_index=True, key="mil_table", width="stretch")
        st.caption(HONEST_NOTE + " " + protocol_line(rows))
    else:
        st.info("No finished cross-validation in this experiment yet.")
    with st.expander("The paper's table (AAAI 2020, 5 x 10-fold CV)"):
        st.dataframe(paper_table(), hide_index=True, key="mil_paper", width="stretch")
        st.caption("The Attention and Gated attention rows are Ilse et al.'s (2018) numbers, "
                   "copied into the AAAI table, not re-run. The paper's FOX has 1,302 "
                   "instances; the standard file has 1,320.")


def protocol_line(rows: list[dict]) -> str:
    """How this experiment chose its epochs and summed its instance loss."""
    config = rows[0].get("config", {})
    choice = EPOCH_CHOICE_LABELS.get(config.get("epoch_choice", "validation"), "?")
    loss = INSTANCE_LOSS_LABELS.get(config.get("instance_loss", "sum"), "?")
    return f"Epochs chosen by: {choice}; instance loss: {loss}."


# ----------------------------------------------------------------------------------------------
# Instance weights


def weight_browser(folder: Path, rows: list[dict]) -> None:
    if not rows:
        return
    pairs = [f"{r['dataset']} / {r['method']}" for r in rows]
    c1, c2 = st.columns([2, 1])
    pair = c1.selectbox("Data set / method", pairs, **keep("mil_pair", pairs[0], pairs))
    kinds = ["all", "positive", "negative", "misclassified"]
    which = c2.selectbox("Bags", kinds, **keep("mil_filter", "all", kinds))
    dataset, method = pair.split(" / ")
    bags = read_bag_weights(folder, dataset, method)
    if which == "positive":
        bags = [b for b in bags if b["label"] == 1]
    elif which == "negative":
        bags = [b for b in bags if b["label"] == 0]
    elif which == "misclassified":
        bags = [b for b in bags if (b["probability"] >= 0.5) != (b["label"] == 1)]
    if not bags:
        st.info("No bag of that kind (weights are kept for the first repetition's test folds).")
        return
    numbers = [b["bag"] for b in bags]
    number = st.selectbox("Bag", numbers, **keep("mil_bag", numbers[0], numbers))
    bag = bags[numbers.index(number)]
    verdict = "right" if (bag["probability"] >= 0.5) == (bag["label"] == 1) else "wrong"
    st.caption(f"Bag {bag['bag']}: label {bag['label']}, P(positive) {bag['probability']:.3f} "
               f"({verdict}), {len(bag['weights'])} instances, test fold {bag['fold'] + 1} of "
               "the first repetition." + (" Red: instances of the target digit."
                                          if bag.get("instance_labels") is not None else ""))
    st.plotly_chart(bag_weights_figure(bag), key="mil_weights_chart")


# ----------------------------------------------------------------------------------------------
# Page


ensure_router()
st.title("MIL: multiple-instance learning")
st.caption("Loss-Attention (AAAI 2020) on MUSK1/2, FOX, TIGER, ELEPHANT and embedded digit bags: "
           "repeated stratified 10-fold cross-validation; standardisation and model selection "
           "use the training folds only. Runs in a background process; leave the page freely.")
launch_form()
st.divider()
with guard("The MIL page"):
    shipped = shipped_choices()
    choices = list_experiments(runs_root()) + list(shipped)
    if not choices:
        st.info("No MIL experiment yet: start one above.")
        st.stop()
    choice = st.selectbox("Experiment", choices, **keep("mil_experiment", choices[0], choices))
    folder = shipped.get(choice) or mil_root(runs_root()) / choice
if choice not in shipped:  # a shipped table has no job to watch
    progress(folder)
with guard("The MIL results"):
    rows = read_results(folder)
    results(rows)
    st.subheader("Instance weights of the test bags")
    weight_browser(folder, rows)
