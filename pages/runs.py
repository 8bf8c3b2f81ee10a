"""Runs: every run in the store; compare curves and configs; export; delete."""

import datetime

import streamlit as st

from engine.metric_table import label, metrics_of
from engine.sweep import config_value, varied_fields
from ui.figures import metric_overlay
from ui.overlay import csv_bytes
from ui.st_state import guard, keep, store

CURVE_KEYS = [m.key for m in metrics_of("epoch")]


def table_rows(rows: list[dict]) -> list[dict]:
    return [{
        "name": r["name"], "state": r["state"], "data": r["dataset"],
        "model": f"{r['backbone']}/{r['head']}", "γmax": r["gamma_max"], "ξ": r["xi"],
        "epochs": f"{r['epochs_done']}/{r['epochs']}", "metric": r["metric_name"],
        "best": r["best_metric"], "best epoch": None if r["best_epoch"] is None
        else r["best_epoch"] + 1, "last": r["last_metric"],
        "minutes": round((r["duration_s"] or 0) / 60, 2),
        "created": datetime.datetime.fromtimestamp(r["created"] or 0).strftime("%Y-%m-%d %H:%M"),
        "skipped images": r.get("skipped") or 0,
        "tags": ", ".join(r["tags"]), "note": r["reason"],
    } for r in rows]


st.title("Runs")
with guard("The run table"):
    rows = store().list()
    if not rows:
        st.info("No runs yet: the Train and Sweep pages start them, and so does "
                "`python -m engine train`.")
        st.stop()
    text = st.text_input("Filter (name, model, data or tag contains)", **keep("runs_filter", ""))
    shown = [r for r in table_rows(rows)
             if text.lower() in " ".join(str(v) for v in r.values()).lower()]
    st.dataframe(shown, hide_index=True, key="runs_table")
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
