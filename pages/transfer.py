"""Mutual transfer: two peers that learn where to look from each other's local attention maps.

Launch a pair (and its λ = 0 control with the same seed) in the background, watch both, look at
what the transfer loss sees on one image (each peer's global map on one colour scale, the
local regions, and the Pearson ρ of every region), and measure mutual against alone.
"""

import dataclasses

import streamlit as st
import torch

from engine import launch
from engine.config import MAP_SOURCES
from engine.data.base import model_input
from engine.jobs import LIVE, State
from engine.metric_table import DEFAULT_MASK, MASKS
from engine.models import head_spec, list_backbones, list_heads
from engine.pictures import enlarge, to_hwc
from engine.safe_io import JSON_CAP, read_text
from engine.team import local_view
from engine.transfer import (
    MAP_LABELS,
    SEED_PAPER,
    add_intervals,
    experiments,
    judged_peers,
    launch_pair,
    read_results,
    summarise,
)
from ui.figures import local_maps_figure, transfer_table
from ui.st_forms import config_of, progress_of, run_settings, show_job_end
from ui.st_guards import guard
from ui.st_links import ensure_router
from ui.st_models import PROJECT_ROOT, loaded_model, store, test_set
from ui.st_session import keep, remember

WATCH_KEY = "mt_watch"
RESULTS_DIR = PROJECT_ROOT / "results" / "transfer"
SOURCE_LABELS = {"activations": "activations", "patch_weights": "patch weights"}
SOURCE_HELP = ("activations: the channel mean of |a|^p of the backbone's deepest layers, "
               "each resized and normalised, summed. patch weights: the Loss-Attention patch "
               "weights on their grid (Loss-Attention peers only).")


def peer_picker(column, k: int, backbones: list[str], heads: list[str]) -> dict:
    column.markdown(f"**Peer {k}**")
    return {"backbone": column.selectbox("Backbone", backbones,
                                         **keep(f"mt_bb{k}", "small_cnn", backbones)),
            "head": column.selectbox("Head", heads, format_func=lambda h: head_spec(h).label,
                                     **keep(f"mt_head{k}", "loss_attention", heads))}


def launch_form(expanded: bool) -> None:
    with st.expander("Train a new pair (the data, epochs and the rest apply to both peers)",
                     expanded=expanded):
        settings = run_settings("mt", heads=False, backbone=False)
        backbones, heads = list_backbones(), list_heads()
        c0, c1, c2 = st.columns([1, 1, 2])
        peers = [peer_picker(c0, 0, backbones, heads), peer_picker(c1, 1, backbones, heads)]
        c2.markdown("**Transfer**")
        a, b = c2.columns(2)
        transfer = {
            "lam": a.number_input("λ", 0.0, 100.0, step=0.5, format="%.2f",
                                  **keep("mt_lam", 1.0)),
            "grid": int(b.number_input("Grid (g x g regions)", 1, 64, step=1,
                                       **keep("mt_grid", 4, low=1, high=64))),
            "map_source": a.selectbox("Map source", MAP_SOURCES, format_func=SOURCE_LABELS.get,
                                      help=SOURCE_HELP,
                                      **keep("mt_source", "activations", MAP_SOURCES)),
            "layers": int(b.number_input("Layers", 1, 8, step=1, **keep("mt_layers", 3))),
            "kl": a.number_input("KL weight (mutual learning)", 0.0, 10.0, step=0.1,
                                 **keep("mt_kl", 0.0))}
        # Its own row: in the transfer column's half its label was cut at 1366 px.
        n1, n2, n3 = st.columns([2, 2, 1], vertical_alignment="bottom")
        name = n1.text_input("Experiment name", **keep("mt_name", "pair"))
        control = n2.checkbox("Also train alone (λ = 0, same seed)", **keep("mt_control", True))
        submitted = n3.button("Launch", type="primary", key="mt_launch")
    if submitted:
        with guard("Launching", stop=False):
            settings["model"] = {**settings["model"], **peers[0]}
            base = config_of(settings)
            base = dataclasses.replace(base, transfer={**transfer, "peers": [
                {**settings["model"], **peers[1]}]})
            runs = launch_pair(store(), base, name.strip() or "pair", base.train.seed, control)
            remember(WATCH_KEY, name.strip() or "pair")
            st.success("Started " + " and ".join(r.name for r in runs) + " in the background.")


@st.fragment(run_every=1.0)
def live_panel(rows: list[dict]) -> None:
    with guard("The live view", stop=False):
        for row in rows:
            if not store().exists(row["name"]):
                continue
            run = store().get(row["name"])
            status = run.status()
            fraction, text = progress_of(run, status)
            c1, c2 = st.columns([6, 1])
            c1.progress(fraction, text=f"{run.name}: {text}")
            if c2.button("Stop", disabled=status.state not in LIVE,
                         key=f"mt_stop_{run.name}"):
                store().stop(run.name)
            if status.state in (State.STOPPED, State.FAILED) and c2.button(
                    "Resume", key=f"mt_resume_{run.name}"):
                launch.resume(store(), run.name)
            if status.state != State.FINISHED:  # the bar says finished; no box for it
                show_job_end(status, f"Run {run.name}", "Resume continues it.")


def maps_section(row: dict) -> None:
    st.subheader("What the transfer loss sees")
    paths = store().get(row["name"]).peer_checkpoints()
    if len(paths) < 2:
        st.info(f"{row['name']} has no peer checkpoints yet: they appear after its first epoch.")
        return
    loaded = [loaded_model(p) for p in paths]
    transfer = store().get(row["name"]).config().transfer
    data = test_set(loaded[0].data_config)
    c1, c2 = st.columns([1, 5])  # the image's number above it: the maps stay on one screen
    index = int(c1.number_input("Test image", 0, len(data) - 1, step=1,
                                **keep("mt_index", 0, low=0, high=len(data) - 1)))
    x = model_input(data, data.images[index:index + 1])
    locks = [m.lock for m in loaded]
    for lock in locks:
        lock.acquire()
    try:
        view = local_view([m.model for m in loaded], x, transfer)
        predicted = [data.classes[int(m.model(x).logits.argmax())] for m in loaded]
    finally:
        for lock in locks:
            lock.release()
    c1.image(enlarge(to_hwc(data.images[index]), 4),
             caption=f"#{index}, true {data.classes[int(data.targets[index])]}"
             if not data.multilabel else f"#{index}")
    titles = [f"peer {k}: says {p}" for k, p in enumerate(predicted)]
    c2.plotly_chart(local_maps_figure(view["maps"][:, 0].numpy(), view["rho"][:, 0].numpy(),
                                      titles), key="mt_maps")
    rho = view["rho"][:, 0]
    models = ", ".join(f"peer {k} = {m.model.config.backbone}/{m.model.config.head}"
                       for k, m in enumerate(loaded))
    st.caption(f"{models}. Global maps from `{transfer.map_source}`, each divided by the "
               "largest peak of the peers' maps, so one colour means one value. The white lines "
               f"cut the {transfer.grid}x{transfer.grid} local regions; the transfer loss is the "
               f"mean of 1 - ρ over them (here {float((1 - rho).mean()):.3f}).")


@st.cache_data(show_spinner="Judging every peer's maps (Grad-CAM, deletion, insertion)...",
               max_entries=8)
def _judged(runs: tuple[tuple[str, str], ...], stamps: tuple[float, ...], images: int,
            mask: str) -> list[dict]:
    """Every peer of the (run name, arm) pairs, judged on the first ``images`` test images
    under ``mask``; a run judged so before, here or by ``python -m engine transfer``, keeps
    its rows in its folder (engine.transfer.judged_peers) and is not judged again."""
    del stamps  # part of the cache key: a run trained further is judged again
    rows = []
    for name, arm in runs:
        run = store().get(name)
        rows += [{**r, "arm": arm, "seed": run.config().train.seed}
                 for r in judged_peers(run, images, 16, torch.device("cpu"), mask)]
    return rows


def metrics_section(arms: dict[str, list[dict]]) -> None:
    st.subheader("Mutual vs alone")
    done = {arm: [r for r in rows if r["state"] == State.FINISHED] for arm, rows in arms.items()}
    if not (done["mutual"] and done["alone"]):
        st.info("Both arms must finish (launch with \"Also train alone\") before they can be "
                "compared.")
        return
    c1, c2 = st.columns(2)
    images = c1.select_slider("Test images to judge on", [32, 64, 128, 256],
                              **keep("mt_images", 64, [32, 64, 128, 256]))
    masks = list(MASKS)
    # The mask decides results (docs/faithfulness.md): the reader picks it and sees it named.
    mask = c2.selectbox("Mask: left-out pixels become", masks,
                        **keep("mt_mask", DEFAULT_MASK, masks),
                        help="; ".join(f"{k}: {v}" for k, v in MASKS.items()))
    runs = tuple((r["name"], arm) for arm in ("mutual", "alone") for r in done[arm])
    if st.button("Measure", type="primary", key="mt_measure"):
        remember("mt_measured", (runs, images, mask))
    if st.session_state.get("mt_measured") == (runs, images, mask):
        stamps = tuple(store().get(name).status_mtime() for name, _ in runs)
        summary = summarise(_judged(runs, stamps, images, mask))
        st.dataframe(interval_table(summary), hide_index=True)
        st.caption(f"Mask {mask}: {MASKS[mask]}. " + REFERENCE_NOTE + " " + INTERVAL_NOTE)
    st.caption(f"The seed paper reports Average Drop {SEED_PAPER['average_drop_pct']} % and "
               f"Increase in Confidence {SEED_PAPER['increase_in_confidence_pct']} % on its own "
               "peers and data (only the abstract is available); compare the direction of the "
               "change, not the level.")


REFERENCE_NOTE = ("Maps named ref: are reference maps that know nothing of the model: a "
                  "yardstick, not a method.")
INTERVAL_NOTE = ("95 % interval: Student t over the per-seed differences (n − 1 degrees of "
                 "freedom; none with one seed, and wide with three: t = 4.30). Only an interval "
                 "that excludes 0 says which way the change went.")


def interval_table(summary: list[dict]) -> list[dict]:
    """The mutual-vs-alone table with each difference's 95 % interval beside it. The
    difference shows its mean only (the interval says how far it may be off) and the seed
    paper's column a short heading, so that the table fits a 1366 px screen."""
    table = []
    for r, row in zip(summary, transfer_table(summary, MAP_LABELS, SEED_PAPER), strict=True):
        low, high = r.get("difference_low"), r.get("difference_high")
        digits = 1 if r["metric"].endswith("_pct") else 3
        cell = "" if low is None or high is None else f"{low:.{digits}f} to {high:.{digits}f}"
        ordered = {}
        for key, value in row.items():
            if key == "mutual - alone":
                mean = r["difference_mean"]
                ordered[key] = "" if mean is None else f"{mean:.{digits}f}"
                ordered["95 % interval"] = cell
            else:
                ordered["seed paper" if key == "seed paper (its setting)" else key] = value
        table.append(ordered)
    return table


def saved_results() -> None:
    folders = sorted(p for p in RESULTS_DIR.glob("*") if (p / "results.json").is_file())
    if not folders:
        return
    st.subheader("Measured results (python -m engine transfer)")
    folder = st.selectbox("Experiment", folders, format_func=lambda p: p.name,
                          **keep("mt_results", folders[0], folders))
    report = read_results(folder)
    if report is None:
        st.warning(f"{folder.name}/results.json is unreadable.")
        return
    try:
        summary = read_text(folder / "results.md", JSON_CAP, "a transfer summary")
        st.markdown(summary.split("\n", 2)[-1].split("## ")[0])
    except (OSError, ValueError) as exc:
        st.caption(f"No summary text: {exc}")
    st.dataframe(interval_table(add_intervals(report)["summary"]), hide_index=True)
    st.caption(f"Mask: {report.get('mask', 'black')} (what replaces the pixels a map leaves "
               "out; docs/faithfulness.md). " + REFERENCE_NOTE + " " + INTERVAL_NOTE)


ensure_router()
st.title("Mutual transfer")
st.markdown(
    "Two peers train on the same batches. Each one's **global attention map** (its layers' "
    "activation maps, superimposed) is cut into **local regions**; the loss adds λ · (1 − ρ), "
    "with ρ the **Pearson correlation** of corresponding regions against the other peer's map "
    "(which is not changed by it). Alone (λ = 0) the same peers train exactly as they would "
    "by themselves.")
with guard("Mutual transfer"):
    launch_form(expanded=not experiments(store()))
    found = experiments(store())  # again: a pair launched just now is in it
    if found:
        names = list(found)
        chosen = st.selectbox("Experiment", names, **keep(WATCH_KEY, names[0], names))
        arms = found[chosen]
        live_panel([r for arm in ("mutual", "alone") for r in arms[arm]])
        if arms["mutual"]:
            maps_section(arms["mutual"][0])
        metrics_section(arms)
    else:
        st.info("No mutual-transfer runs yet: launch a pair above. Its progress bar shows the "
                "time left, measured from its own steps, once it is running.")
    saved_results()
