"""Compare maps: Loss-Attention's patch weights beside Grad-CAM, Grad-CAM++ and Score-CAM on the
same images, with the faithfulness numbers for each (and the baselines they use).

Loss-Attention, Grad-CAM and Grad-CAM++ come from one backbone pass and are shown at once.
Score-CAM runs the model once per feature channel and image, so it waits for the user to ask;
each image's Score-CAM map is kept, so a second look at it costs nothing.
"""

from pathlib import Path

import numpy as np
import streamlit as st
import torch

from engine.explain import METHODS, ONE_PASS, compare_maps, faithfulness, remembered_maps
from engine.metric_table import metrics_of
from engine.pictures import enlarge, map_overlay, to_hwc
from ui.st_state import (
    ensure_router,
    guard,
    keep,
    loaded_model,
    map_memo,
    require_model_path,
    test_set,
)

COLUMNS = {m.key: m.heading for m in metrics_of("faithfulness")}
ON_DEMAND = "scorecam"
SIZES = [16, 32, 64, 128, 256]


@st.cache_data(show_spinner="Computing the maps...", max_entries=16)
def _maps(path: str, mtime_ns: int, start: int, count: int, class_choice: str,
          methods: tuple[str, ...], xi: float) -> dict:
    del mtime_ns
    loaded = loaded_model(path)
    data = test_set(loaded.data_config)
    indices = torch.arange(start, min(start + count, len(data)))
    with loaded.lock:  # Score-CAM's hooks attach to this shared model
        return compare_maps(loaded.model, data, indices, class_choice, methods, xi)


def score_cam(loaded, result: dict) -> np.ndarray:
    """Score-CAM of the images shown: those seen before from the memo, the rest in one batch."""
    with loaded.lock, st.spinner("Computing Score-CAM (a forward pass per feature channel and "
                                 "image)..."):
        return remembered_maps(map_memo(loaded, ON_DEMAND), loaded.model,
                               test_set(loaded.data_config), result["indices"],
                               result["classes"], ON_DEMAND)


@st.cache_data(show_spinner=False, max_entries=32)
def _faithfulness(path: str, mtime_ns: int, count: int, method: str, xi: float) -> dict:
    del mtime_ns
    loaded = loaded_model(path)
    data = test_set(loaded.data_config)
    indices = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]
    with loaded.lock:
        return faithfulness(loaded.model, data, torch.device("cpu"), indices.sort().values,
                            [method], xi=xi)


def draw_maps(loaded, data, result: dict, shown: list[str]) -> None:
    """One row per image: the image, then each method's map; Score-CAM's cells are filled last,
    so that the other maps are on screen while it is computed."""
    header = st.columns(len(shown) + 1)
    header[0].markdown("**image**")
    for col, method in zip(header[1:], shown, strict=True):
        col.markdown(f"**{METHODS[method]}**")
    images, later = [], []
    for row, index in enumerate(result["indices"]):
        cols = st.columns(len(shown) + 1)
        images.append(to_hwc(data.images[index]))
        cols[0].image(enlarge(images[-1]), width=140,
                      caption=f"#{index}: predicted {data.classes[result['predicted'][row]]}, "
                      f"explaining {data.classes[result['classes'][row]]}")
        for col, method in zip(cols[1:], shown, strict=True):
            if method == ON_DEMAND:
                later.append(col.empty())
            else:
                col.image(map_overlay(images[-1], result["maps"][method][row]), width=140)
    if later:
        for slot, image, heat in zip(later, images, score_cam(loaded, result), strict=True):
            slot.image(map_overlay(image, heat), width=140)


def faithfulness_table(path: str, mtime: int, shown: list[str], xi: float) -> None:
    """Measured on demand; one cached row per method, so a method added later (Score-CAM) costs
    only its own row."""
    n = st.select_slider("Images to measure on", SIZES, **keep("cm_n", 32, SIZES))
    if st.button("Measure", key="cm_measure", type="primary"):
        st.session_state["cm_measured"] = (path, n)
    if st.session_state.get("cm_measured") != (path, n):
        return
    reports = {}
    for method in shown:
        with st.spinner(f"Measuring {METHODS[method]} on {n} images..."):
            reports[method] = _faithfulness(path, mtime, n, method, xi)
    st.dataframe([{"method": METHODS[m], **{COLUMNS[k]: round(v, 4)
                                            for k, v in r["methods"][m].items()}}
                  for m, r in reports.items()], hide_index=True)
    first = next(iter(reports.values()))
    st.caption(f"{first['images']} test images (a fixed random sample), "
               f"class: {first['class']}.")


ensure_router()
st.title("Compare maps")
with guard("Compare maps"):
    path = require_model_path()
    loaded = loaded_model(path)
    mtime = Path(path).stat().st_mtime_ns
    data = test_set(loaded.data_config)
    has_patches = loaded.model.head.has_patches
    methods = [m for m in METHODS if has_patches or m != "loss_attention"]
    c1, c2, c3, c4 = st.columns(4)
    chosen = c1.multiselect("Methods", methods, format_func=METHODS.get,
                            **keep("cm_methods", methods, methods))
    start = int(c2.number_input("First test image", 0, len(data) - 1, step=1,
                                **keep("cm_start", 0, low=0, high=len(data) - 1)))
    count = int(c3.number_input("Images", 1, 8, step=1, **keep("cm_count", 4, low=1, high=8)))
    choices = ["true", "predicted", *data.classes]
    class_choice = c4.selectbox("Explain class", choices, **keep("cm_class", "true", choices))
    xi = float(loaded.model.config.xi)
    if not chosen:
        st.info("Pick at least one method.")
        st.stop()
    on_demand = ON_DEMAND in chosen and st.toggle(
        "Compute Score-CAM", **keep("cm_scorecam", False),
        help="Score-CAM runs the model once per feature channel and image: seconds here, "
             "minutes for a large backbone on a CPU. Each image's map is kept once made.")
    shown = [m for m in chosen if m in ONE_PASS or on_demand]
    if ON_DEMAND in chosen and not on_demand:
        st.caption("Score-CAM is computed when you turn it on (above), for its maps and its "
                   "faithfulness row.")
    if not shown:
        st.stop()
    result = _maps(path, mtime, start, count, class_choice,
                   tuple(m for m in shown if m in ONE_PASS), xi)
    if "loss_attention" in shown:
        st.caption("Loss-Attention's map is its patch weights (one per patch, painted on the "
                   "patch's pixel box, overlaps averaged): it is the same whichever class is "
                   "explained. The CAMs are computed for the chosen class and upsampled.")
    draw_maps(loaded, data, result, shown)

    st.subheader("Faithfulness")
    st.caption(
        "Average Drop / Increase in Confidence: the image multiplied by the map (unexplained "
        "pixels go black), score of the explained class before and after (Grad-CAM++'s relative "
        "definitions). Deletion: the most important pixels set to black first; insertion: "
        "pixels put back into a blurred copy (σ = side/8); AUC of the score over 16 steps. "
        "Pointing game: the map's maximum within 15 px of a true box; energy: the share of "
        "the map inside the true boxes. The class is the true label.")
    faithfulness_table(path, mtime, shown, xi)
