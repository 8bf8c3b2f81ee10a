"""Compare maps: Loss-Attention's patch weights beside Grad-CAM, Grad-CAM++ and Score-CAM on the
same images, with the faithfulness numbers for each (and the baselines they use)."""

from pathlib import Path

import streamlit as st
import torch

from engine.explain import METHODS, compare_maps, faithfulness
from engine.metric_table import metrics_of
from ui.overlay import enlarge, map_overlay, to_hwc
from ui.st_state import guard, keep, loaded_model, require_model_path, test_set

COLUMNS = {m.key: m.heading for m in metrics_of("faithfulness")}


@st.cache_data(show_spinner="Computing the maps...", max_entries=16)
def _maps(path: str, mtime_ns: int, start: int, count: int, class_choice: str,
          methods: tuple[str, ...], xi: float) -> dict:
    del mtime_ns
    loaded = loaded_model(path)
    data = test_set(loaded.data_config)
    indices = torch.arange(start, min(start + count, len(data)))
    with loaded.lock:  # the CAM hooks attach to this shared model
        return compare_maps(loaded.model, data, indices, class_choice, methods, xi)


@st.cache_data(show_spinner="Measuring faithfulness (Score-CAM takes longest)...",
               max_entries=8)
def _faithfulness(path: str, mtime_ns: int, count: int, methods: tuple[str, ...],
                  xi: float) -> dict:
    del mtime_ns
    loaded = loaded_model(path)
    data = test_set(loaded.data_config)
    indices = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]
    with loaded.lock:
        return faithfulness(loaded.model, data, torch.device("cpu"), indices.sort().values,
                            list(methods), xi=xi)


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
    result = _maps(path, mtime, start, count, class_choice, tuple(chosen), xi)
    if "loss_attention" in chosen:
        st.caption("Loss-Attention's map is its patch weights (one per patch, painted on the "
                   "patch's pixel box, overlaps averaged): it is the same whichever class is "
                   "explained. The CAMs are computed for the chosen class and upsampled.")
    header = st.columns(len(chosen) + 1)
    header[0].markdown("**image**")
    for col, method in zip(header[1:], chosen, strict=True):
        col.markdown(f"**{METHODS[method]}**")
    for row, index in enumerate(result["indices"]):
        cols = st.columns(len(chosen) + 1)
        image = to_hwc(data.images[index])
        cols[0].image(enlarge(image), width=140,
                      caption=f"#{index}: predicted {data.classes[result['predicted'][row]]}, "
                      f"explaining {data.classes[result['classes'][row]]}")
        for col, method in zip(cols[1:], chosen, strict=True):
            col.image(map_overlay(image, result["maps"][method][row]), width=140)

    st.subheader("Faithfulness")
    st.caption(
        "Average Drop / Increase in Confidence: the image multiplied by the map (unexplained "
        "pixels go black), score of the explained class before and after (Grad-CAM++'s relative "
        "definitions). Deletion: the most important pixels set to black first; insertion: "
        "pixels put back into a blurred copy (σ = side/8); AUC of the score over 16 steps. "
        "Pointing game: the map's maximum within 15 px of a true box; energy: the share of "
        "the map inside the true boxes. The class is the true label.")
    n = st.select_slider("Images to measure on", [16, 32, 64, 128, 256],
                         **keep("cm_n", 32, [16, 32, 64, 128, 256]))
    if st.button("Measure", key="cm_measure", type="primary"):
        st.session_state["cm_measured"] = (path, n, tuple(chosen))
    if st.session_state.get("cm_measured") == (path, n, tuple(chosen)):
        report = _faithfulness(path, mtime, n, tuple(chosen), xi)
        st.dataframe([{"method": METHODS[m], **{COLUMNS[k]: round(v, 4) for k, v in r.items()}}
                      for m, r in report["methods"].items()], hide_index=True)
        st.caption(f"{report['images']} test images (a fixed random sample), "
                   f"class: {report['class']}.")
