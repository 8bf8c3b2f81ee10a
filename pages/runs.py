"""Runs: every run in the store; compare curves and configs; export; delete."""

import datetime
from pathlib import Path

import streamlit as st

from engine import launch
from engine.jobs import ACTIVE, LIVE, State
from engine.metric_table import label, metrics_of
from engine.slots import Slots
from engine.sweep import config_value, varied_fields
from ui.figures import metric_overlay
from ui.overlay import csv_bytes
from ui.st_guards import guard
from ui.st_links import ensure_router
from ui.st_models import store
from ui.st_session import keep, remember
from ui.st_watch import explorable, explore_run, look_at_queue
from ui.tables import md_text

CURVE_KEYS = [m.key for m in metrics_of("epoch")]
# The table's columns, a group at a time: all sixteen side by side need about 1,600 px, and a
# classroom projector shows 1,366 (the sidebar included). Each group fits with an automatic run
# name; the CSV and the table's own column menu have every column, and the notes are listed
# under the table.
VIEWS = {"results": ["name", "state", "epochs", "metric", "best", "best epoch", "last",
                     "minutes"],
         "model and data": ["name", "data", "model", "γmax", "ξ", "skipped images"],
         "when and tags": ["name", "created", "tags"]}


def model_label(backbone: str, head: str) -> str:
    """``backbone/head``; a mutual-transfer run's peers (the store joins them with " + ") one by
    one, or ``2 × backbone/head`` when they are the same."""
    peers = [f"{b}/{h}" for b, h in zip(backbone.split(" + "), head.split(" + "), strict=False)]
    if len(peers) > 1 and len(set(peers)) == 1:
        return f"{len(peers)} × {peers[0]}"
    return " + ".join(peers)


def table_rows(rows: list[dict], queued: list | None = None) -> list[dict]:
    """The table's rows; ``queued``: the store's queue in order, for a queued run's place."""
    order = [Path(q).name for q in queued or []]

    def note(r: dict) -> str:
        if r["state"] == State.QUEUED and r["name"] in order:
            return (f"place {order.index(r['name']) + 1} of {len(order)} in the queue; starts "
                    "when a running job ends")
        return r["reason"]

    return [{
        "name": r["name"], "state": r["state"], "data": r["dataset"],
        "model": model_label(r["backbone"], r["head"]), "γmax": r["gamma_max"], "ξ": r["xi"],
        "epochs": f"{r['epochs_done']}/{r['epochs']}", "metric": r["metric_name"],
        "best": r["best_metric"], "best epoch": None if r["best_epoch"] is None
        else r["best_epoch"] + 1, "last": r["last_metric"],
        "minutes": round((r["duration_s"] or 0) / 60, 2),
        "created": datetime.datetime.fromtimestamp(r["created"] or 0).strftime("%Y-%m-%d %H:%M"),
        "skipped images": r.get("skipped") or 0,
        "tags": ", ".join(r["tags"]), "note": note(r),
    } for r in rows]


def notes_text(rows: list[dict]) -> str:
    """The rows' notes (a queued run's place, why one failed or stopped) as a markdown list:
    under the table, where a long reason wraps instead of widening a column."""
    return "\n".join(f"- **{md_text(r['name'])}** ({r['state']}): {md_text(r['note'])}"
                      for r in rows if r["note"])


def row_actions(name: str) -> None:
    """What can be done with the picked run, by its state."""
    run = store().get(name)
    state = run.status().state
    c1, c2, c3, c4, c5 = st.columns([1.6, 1.2, 1, 1, 1.4])
    if c1.button("Open in the Explorer", type="primary", key="runs_row_explore",
                 disabled=not explorable(run), help="Its best checkpoint, in the Patch Explorer"):
        explore_run(name)
    if c2.button("Watch on Train", key="runs_row_watch"):
        remember("tr_watch", name)
        st.switch_page("pages/train.py")
    if c3.button("Resume", key="runs_row_resume",
                 disabled=state not in (State.STOPPED, State.FAILED)):
        with guard(f"Resuming {name}", stop=False):
            launch.resume(store(), name)
            st.toast(f"Resumed {name}.")
    if c4.button("Stop", key="runs_row_stop", disabled=state not in LIVE):
        store().stop(name)
        st.toast(f"{name} is out of the queue: it never started." if state == State.QUEUED else
                 f"Stopping {name}: it checkpoints and stops after the current step.")
    # The tick belongs to this run (its own key): picking another row never inherits it.
    sure = c5.checkbox("delete it", key=f"runs_row_sure_{name}", disabled=state in ACTIVE,
                       help="Tick, then press Delete: its folder and checkpoints go")
    if sure and c5.button("Delete", key="runs_row_delete"):
        with guard(f"Deleting {name}", stop=False):
            store().delete(name)
            st.toast(f"Deleted {name}")
            st.session_state.pop("runs_table", None)  # no row stays picked
            st.rerun()


ensure_router()
st.title("Runs")
with guard("The run table"):
    look_at_queue()
    rows = store().list()
    if not rows:
        st.info("No runs yet: the Train and Sweep pages start them, and so does "
                "`python -m engine train`.")
        st.stop()
    c1, c2 = st.columns(2, vertical_alignment="bottom")
    text = c1.text_input("Filter (name, model, data or tag contains)", **keep("runs_filter", ""))
    queued = Slots(store().root).queued() if any(r["state"] == State.QUEUED for r in rows) else []
    shown = [r for r in table_rows(rows, queued)
             if text.lower() in " ".join(str(v) for v in r.values()).lower()]
    view = c2.radio("Columns", list(VIEWS), horizontal=True,
                    **keep("runs_view", "results", list(VIEWS)),
                    help="The table shows one group of columns at a time, so that it fits the "
                         "screen; the CSV below has them all.")
    picked = st.dataframe(shown, hide_index=True, key="runs_table", on_select="rerun",
                          selection_mode="single-row", column_order=VIEWS[view])
    notes = notes_text(shown)
    if notes:
        st.markdown(notes)
    rows_picked = picked.selection.rows if picked else []
    if rows_picked and rows_picked[0] < len(shown):
        row_actions(shown[rows_picked[0]]["name"])
    else:
        st.caption("Click a row's left edge to open, resume, stop or delete that run.")
    st.download_button("Runs table CSV", csv_bytes(shown), "runs.csv", "text/csv",
                       key="runs_dl")
    names = [r["name"] for r in shown]
    default = names[:2]
    chosen = st.multiselect("Compare runs", names, **keep("runs_chosen", default, names))
    chosen = [n for n in chosen if store().exists(n)]

if chosen:
    with guard("The comparison"):
        runs = {n: store().get(n) for n in chosen}
        metrics = {n: run.metrics() for n, run in runs.items()}
        keys = [k for k in CURVE_KEYS if any(k in row for m in metrics.values() for row in m)]
        if keys:
            key = st.selectbox("Curve", keys, format_func=label,
                               **keep("runs_curve", keys[0], keys))
            st.plotly_chart(metric_overlay(metrics, key), key="runs_overlay")
        best = {r["name"]: r["best_metric"] for r in rows if r["name"] in runs}
        st.write("Best test metric: " + ", ".join(
            f"**{n}** {v:.4f}" if v is not None else f"**{n}** -" for n, v in best.items()))
        if len(runs) > 1:
            fields = varied_fields(list(runs.values()))
            if fields:
                st.caption("Config fields that differ between the chosen runs")
                configs = {n: run.config_dict() for n, run in runs.items()}
                st.dataframe([{"field": f, **{n: str(config_value(configs[n], f))
                                              for n in runs}} for f in fields], hide_index=True)
            else:
                st.caption("The chosen runs have the same config.")

        with st.expander("Delete runs"):
            victims = st.multiselect("Runs to delete", chosen, key="runs_delete_pick")
            sure = st.checkbox("Yes, delete their folders and checkpoints", key="runs_delete_ok")
            if st.button("Delete", disabled=not (victims and sure), key="runs_delete"):
                for name in victims:
                    with guard(f"Deleting {name}", stop=False):
                        store().delete(name)
                        st.toast(f"Deleted {name}")
                st.session_state["runs_chosen"] = [n for n in chosen if n not in victims]
                st.rerun()
