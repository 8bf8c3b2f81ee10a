"""Curves: patch-level precision-recall over the weight threshold (per class and overall, with
AP); image-level PR per class for multi-label models.

The backbone pass over the test images is the one the Patch Explorer keeps (shared by every page
and session); the curves are then computed from its cached patch outputs, once per model.
"""

from pathlib import Path

import plotly.graph_objects as go
import streamlit as st
import torch
from plotly.colors import sample_colorscale

from engine.evaluate import evaluate_model
from ui.figures import pr_figure
from ui.st_guards import guard
from ui.st_links import ensure_router
from ui.st_models import collected_test_set, loaded_model, require_model_path, test_set
from ui.st_session import keep

XI_POINTS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
SIZES = [500, 1000, 2000, 5000, 10000]


@st.cache_data(show_spinner="Measuring the curves...", max_entries=4)
def _report(path: str, mtime_ns: int, limit: int) -> dict:
    del mtime_ns
    loaded = loaded_model(path)
    data, collected = collected_test_set(loaded, limit)
    groups = ["image", "patch"] if loaded.model.head.has_patches and data.has_boxes else ["image"]
    with loaded.lock:
        return evaluate_model(loaded.model, data, torch.device("cpu"), groups=groups,
                              xi_grid=XI_POINTS, collected=collected)


def operating_points(report: dict) -> list[go.Scatter]:
    """The model's (recall, precision) at several ξ: points on the curve, since thresholding
    the ξ = 0 weights is what ξ does. One legend entry per ξ (labels on the plot overlap where
    the points crowd), coloured from light to dark as ξ grows."""
    rows = [r for r in report["by_xi"] if "patch" in r]
    shades = sample_colorscale("Reds", [0.35 + 0.65 * i / max(1, len(rows) - 1)
                                        for i in range(len(rows))])
    return [go.Scatter(x=[r["patch"]["recall"]], y=[r["patch"]["precision"]], mode="markers",
                       marker={"size": 11, "color": shade, "line": {"color": "black",
                                                                    "width": 1}},
                       name=f"ξ = {r['xi']:g}: P {r['patch']['precision']:.2f}, "
                       f"R {r['patch']['recall']:.2f}",
                       hovertemplate=f"ξ = {r['xi']:g}<br>recall %{{x:.3f}}<br>precision "
                       "%{y:.3f}<extra></extra>")
            for r, shade in zip(rows, shades, strict=True)]


def metrics_by_xi(report: dict) -> list[dict]:
    """One row per ξ: accuracy, both patch precision / recall / F definitions, patches kept."""
    rows = []
    for r in report["by_xi"]:
        patch, image = r.get("patch", {}), r.get("image", {})
        row = {"ξ": r["xi"], "accuracy": image.get("accuracy", image.get("map"))}
        for key in ("precision", "recall", "f", "precision_paper", "recall_paper", "f_paper"):
            if key in patch:
                row[key] = patch[key]
        row["patches kept"] = r.get("selection", {}).get("patches_per_image")
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def size_choices(available: int) -> list[int]:
    """The test-set sizes to offer: never more images than there are (the last is all)."""
    return [n for n in SIZES if n < available] + [available]


ensure_router()
st.title("Curves")
with guard("The curves"):
    path = require_model_path()
    choices = size_choices(len(test_set(loaded_model(path).data_config)))
    limit = st.select_slider("Test images", choices, format_func=lambda n: f"{n:,}"
                             + (" (all)" if n == choices[-1] else ""),
                             **keep("cu_limit", min(1000, choices[-1]), choices))
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
        fig.add_traces(operating_points(report))
        fig.update_layout(legend={"orientation": "v", "x": 1.02, "y": 1})
        st.plotly_chart(fig, key="cu_patch_pr")
        st.subheader("Metrics against ξ")
        st.caption("precision / recall / f: over all selected patches; *_paper: the released "
                   "code's definitions (METHOD.md). No retraining: ξ only re-thresholds.")
        st.dataframe(metrics_by_xi(report), hide_index=True, key="cu_by_xi")
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
