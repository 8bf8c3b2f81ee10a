"""The Compare page's figures: every method's map of the same images on one colour scale, and
the deletion / insertion curves behind the AUCs. Streamlit-free (unit-tested directly)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.pictures import BOX_TRUE
from ui.explorer_figures import UPSCALE, image_source
from ui.figures import COLORSCALE, PALETTE, TEMPLATE, color_for

MAP_OPACITY = 0.6


def map_grid_figure(images: Sequence[np.ndarray], maps: dict[str, np.ndarray],
                    row_titles: Sequence[str], boxes: Sequence[Sequence], cell: int = 210
                    ) -> go.Figure:
    """One row per image: the image, then each method's map over it; every map on the one
    colour axis [0, 1] (one colour bar), the true boxes red on every cell. ``maps``: method
    heading -> (B, H, W) in [0, 1]; ``boxes``: per image, (x0, y0, x1, y1) pixel boxes."""
    names = list(maps)
    rows, cols = len(images), len(names) + 1
    h, w = images[0].shape[:2]
    titles = [t for r in range(rows) for t in ([row_titles[r]] + (names if r == 0 else
                                                                     [""] * len(names)))]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.015,
                        vertical_spacing=0.06 if rows > 1 else 0.0)
    for r, image in enumerate(images):
        source = image_source(image, UPSCALE)
        for c in range(cols):
            fig.add_trace(go.Image(source=source, x0=0.5 / UPSCALE, dx=1 / UPSCALE,
                                   y0=0.5 / UPSCALE, dy=1 / UPSCALE, hoverinfo="skip"),
                          row=r + 1, col=c + 1)
            if c:
                heat = np.asarray(maps[names[c - 1]][r], dtype=np.float64)
                fig.add_trace(go.Heatmap(
                    z=heat.tolist(), x0=0.5, dx=1, y0=0.5, dy=1, coloraxis="coloraxis",
                    opacity=MAP_OPACITY, hovertemplate="x %{x:.0f}, y %{y:.0f}: "
                    "%{z:.3f}<extra></extra>"), row=r + 1, col=c + 1)
            for box in boxes[r]:
                x0, y0, x1, y1 = (float(v) for v in box)
                fig.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, row=r + 1, col=c + 1,
                              line={"color": "rgb({},{},{})".format(*BOX_TRUE), "width": 2})
    fig.update_xaxes(range=[0, w], visible=False, constrain="domain")
    for k in range(1, rows * cols + 1):
        fig.update_layout({f"yaxis{'' if k == 1 else k}": {
            "range": [h, 0], "visible": False, "constrain": "domain",
            "scaleanchor": f"x{'' if k == 1 else k}"}})
    fig.update_layout(template=TEMPLATE, height=cell * rows + 60, showlegend=False,
                      margin={"l": 5, "r": 5, "t": 40, "b": 5},
                      coloraxis={"colorscale": COLORSCALE, "cmin": 0, "cmax": 1,
                                 "colorbar": {"title": {"text": "map", "side": "top"},
                                              "thickness": 12, "len": 0.8}})
    for annotation in fig.layout.annotations:  # the subplot titles: smaller than the default
        annotation.font = {"size": 12}
    return fig


def deletion_insertion_figure(curves: dict[str, dict], labels: dict[str, str]) -> go.Figure:
    """Mean class score against the fraction of pixels deleted (left) or inserted (right), one
    line per method: a faithful map's deletion curve falls fast, its insertion curve rises
    fast. ``curves``: method -> {"deletion": [...], "insertion": [...]}; a method whose label
    starts with "ref:" (a reference map, not a method) is drawn dotted."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "deletion: most important pixels removed first",
        "insertion: most important pixels put back first"))
    names = [labels.get(m, m) for m in curves]
    for method, curve in curves.items():
        name = labels.get(method, method)
        steps = len(curve["deletion"]) - 1
        fraction = [i / steps for i in range(steps + 1)]
        colour = color_for(name, names) if len(names) > 1 else PALETTE[0]
        for col, key in ((1, "deletion"), (2, "insertion")):
            fig.add_trace(go.Scatter(x=fraction, y=curve[key], mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1,
                                     line={"color": colour, "dash": "dot" if
                                           name.startswith("ref:") else "solid"},
                                     marker={"size": 4}),
                          row=1, col=col)
    fig.update_xaxes(title_text="fraction of pixels", range=[0, 1])
    fig.update_yaxes(title_text="class score (softmax)", range=[0, 1.02], row=1, col=1)
    fig.update_layout(template=TEMPLATE, height=340, margin={"l": 50, "r": 10, "t": 40, "b": 40},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def cascade_figure(labels: Sequence[str], summaries: dict[str, Sequence], judged_from: int,
                   threshold: float) -> go.Figure:
    """The sanity check over many images: per method, the mean rank correlation with the
    trained maps at each cascade step, its interval drawn as error bars; the pass line dashed
    and the judged steps (from ``judged_from`` on) shaded. ``summaries``: method heading ->
    one :class:`engine.sanity.StepSummary` per step."""
    fig = go.Figure()
    names = list(summaries)
    for name, steps in summaries.items():
        colour = color_for(name, names) if len(names) > 1 else PALETTE[0]
        fig.add_trace(go.Scatter(
            x=list(labels), y=[s.mean for s in steps], name=name, mode="lines+markers",
            line={"color": colour}, error_y={"type": "data", "symmetric": False,
                                             "array": [s.high - s.mean for s in steps],
                                             "arrayminus": [s.mean - s.low for s in steps]},
            customdata=[[s.sd, s.n] for s in steps],
            hovertemplate="%{x}: ρ = %{y:.2f} ± %{customdata[0]:.2f} (sd, "
                          "%{customdata[1]} images)<extra>" + name + "</extra>"))
    fig.add_vrect(x0=judged_from - 0.5, x1=len(labels) - 0.5, fillcolor="rgba(0,0,0,0.05)",
                  line_width=0, annotation_text="judged steps",
                  annotation_position="bottom left")
    fig.add_hline(y=threshold, line={"dash": "dash", "color": "grey"},
                  annotation_text=f"pass: below {threshold}", annotation_position="bottom left")
    fig.update_yaxes(title_text="rank correlation with the trained map", range=[-1.05, 1.05])
    fig.update_layout(template=TEMPLATE, height=330, margin={"l": 60, "r": 10, "t": 30, "b": 40},
                      legend={"orientation": "h", "y": 1.12})
    return fig
