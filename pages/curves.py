"""Curves: patch-level precision-recall over the weight threshold (per class and overall, with
AP); image-level PR per class for multi-label models.

The backbone pass over the test images is the one the Patch Explorer keeps (shared by every page
and session); the curves are then computed from its cached patch outputs, once per model.
"""

from pathlib import Path

import plotly.graph_objects as go
import streamlit as st
import torch

from engine.evaluate import evaluate_model
from ui.figures import pr_figure
from ui.st_state import (
    collected_test_set,
    ensure_router,
    guard,
    keep,
    loaded_model,
    require_model_path,
)

XI_POINTS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]


@st.cache_data(show_spinner="Measuring the curves...", max_entries=4)
def _report(path: str, mtime_ns: int, limit: int) -> dict:
    del mtime_ns
    loaded = loaded_model(path)
    data, collected = collected_test_set(loaded, limit)
    groups = ["image", "patch"] if loaded.model.head.has_patches and data.has_boxes else ["image"]
    with loaded.lock:
        return evaluate_model(loaded.model, data, torch.device("cpu"), groups=groups,
                              xi_grid=XI_POINTS, collected=collected)


def operating_points(report: dict) -> go.Scatter:
    """The model's (recall, precision) at several ξ: points on the curve, since thresholding
    the ξ = 0 weights is what ξ does."""
    rows = [r for r in report["by_xi"] if "patch" in r]
    return go.Scatter(x=[r["patch"]["recall"] for r in rows],
                      y=[r["patch"]["precision"] for r in rows], mode="markers+text",
                      text=[f"ξ={r['xi']:g}" for r in rows], textposition="bottom right",
                      marker={"size": 9, "color": "crimson"}, name="ξ operating points")


ensure_router()
st.title("Curves")
with guard("The curves"):
    path = require_model_path()
    limit = st.select_slider("Test images", [500, 1000, 2000, 5000, 10000],
                             **keep("cu_limit", 1000, [500, 1000, 2000, 5000, 10000]))
    report = _report(path, Path(path).stat().st_mtime_ns, limit)
    st.caption(f"{report['model']['backbone']} / {report['model']['head']} on "
               f"{report['data']['dataset']} ({report['data']['images']} test images)")
    if "patch_pr" not in report:
        st.info("Patch curves need a patch model and a data set with boxes; "
                "this model or data set has none.")
    else:
        curves = report["patch_pr"]
        names = [c["class"] for c in curves["per_class"]]
        picked = st.multiselect("Classes", names, **keep("cu_classes", names[:3], names))
        st.caption("Ground truth: a patch is positive when more than half of its pixel box lies "
                   "in a box of the image's class. The curve sweeps a threshold over the "
                   "patch weights at ξ = 0; the red points are the ξ thresholds.")
        fig = pr_figure(curves, "Patch-level precision-recall", picked)
        fig.add_trace(operating_points(report))
        st.plotly_chart(fig, key="cu_patch_pr")
        st.dataframe([{"class": c["class"], "images": c["images"], "patch AP": c["ap"],
                       "positive patches": c["positives"]} for c in curves["per_class"]],
                     hide_index=True)
    if "image_pr" in report:
        curves = report["image_pr"]
        names = [c["class"] for c in curves["per_class"]]
        picked = st.multiselect("Classes (image level)", names,
                                **keep("cu_img_classes", names[:5], names))
        st.plotly_chart(pr_figure(curves, "Image-level precision-recall (multi-label)", picked),
                        key="cu_image_pr")
