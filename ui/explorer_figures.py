"""The Patch Explorer's figures: the patch map over the image and the sorted scores with ξ's cut.

Plotly, drawn in the browser: a ξ move re-sends a few kilobytes of numbers (the weights, the
removed mask, the boxes) and one small image, instead of a new server-rendered picture. The colour
scale is the fixed √α scale of :mod:`engine.pictures`, so colours compare across images and ξ.
Streamlit-free, so the builders are unit-tested directly.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from engine.pictures import (
    BOX_FOCUS,
    BOX_SELECTED,
    BOX_TRUE,
    NUMBERED_UP_TO,
    REMOVED_GREY,
    WEIGHT_TICKS,
    cell_edges,
    png_bytes,
    weight_colour_value,
)
from ui.figures import COLORSCALE, TEMPLATE

KEPT_COLOUR = "#3b528b"  # viridis' blue: a kept patch's bar
REMOVED_COLOUR = "rgb({},{},{})".format(*REMOVED_GREY)
UPSCALE = 8  # the image is sent enlarged (nearest), so the browser never blurs its pixels


def image_source(image: np.ndarray) -> str:
    """An (H, W, 3) uint8 image as a PNG data URI, enlarged ``UPSCALE`` times."""
    h, w = image.shape[:2]
    big = Image.fromarray(image).resize((w * UPSCALE, h * UPSCALE), Image.Resampling.NEAREST)
    return "data:image/png;base64," + base64.b64encode(png_bytes(big)).decode()


def _rgb(colour: tuple[int, int, int]) -> str:
    return "rgb({},{},{})".format(*colour)


def _box(box, colour, dash: str = "solid") -> dict:
    x0, y0, x1, y1 = (float(v) for v in box)
    return {"type": "rect", "x0": x0, "y0": y0, "x1": x1, "y1": y1, "xref": "x", "yref": "y",
            "line": {"color": _rgb(colour), "width": 3, "dash": dash}}


def patch_map_figure(image: np.ndarray, grid_boxes: np.ndarray, rows: int, cols: int,
                     weights: Sequence[float], kept: Sequence[bool], *,
                     true_boxes: Sequence = (), selection_box=None, focus_patch: int | None = None,
                     title: str | None = None, height: int = 430,
                     colour_bar: bool = True) -> go.Figure:
    """The image with each patch's cell tinted by its weight on the fixed √α scale, removed
    patches greyed out, every patch's number in its cell (grids up to ``NUMBERED_UP_TO``
    patches), the true boxes red, the selected patches' box blue, a focused patch white."""
    h, w = image.shape[:2]
    # Plain lists, not arrays: plotly would send arrays as typed binary blobs, and the cell
    # edges are read back in the browser (tests, hover) as numbers.
    xs, ys = (edges.tolist() for edges in cell_edges(grid_boxes, rows, cols, (h, w)))
    alpha = np.asarray(weights, dtype=np.float64).reshape(rows, cols)
    keep = np.asarray(kept, dtype=bool).reshape(rows, cols)
    numbers = np.arange(rows * cols).reshape(rows, cols)
    colour = np.where(keep, weight_colour_value(alpha), np.nan)
    grey = np.where(keep, np.nan, 1.0)
    hover = [[f"patch {numbers[r, c]}<br>α = {alpha[r, c]:.4f}"
              + ("" if keep[r, c] else "<br>removed by the threshold") for c in range(cols)]
             for r in range(rows)]
    fig = go.Figure()
    fig.add_trace(go.Image(source=image_source(image), x0=0.5 / UPSCALE, dx=1 / UPSCALE,
                           y0=0.5 / UPSCALE, dy=1 / UPSCALE, hoverinfo="skip"))
    fig.add_trace(go.Heatmap(
        x=xs, y=ys, z=colour.tolist(), zmin=0, zmax=1, colorscale=COLORSCALE, opacity=0.55,
        text=hover, hovertemplate="%{text}<extra></extra>", showscale=colour_bar,
        colorbar={"title": {"text": "α", "side": "top"}, "tickvals":
                  weight_colour_value(WEIGHT_TICKS).tolist(),
                  "ticktext": [f"{t:g}" for t in WEIGHT_TICKS], "thickness": 14, "len": 0.9},
        name="kept"))
    fig.add_trace(go.Heatmap(
        x=xs, y=ys, z=grey.tolist(), zmin=0, zmax=1, opacity=0.75, showscale=False,
        colorscale=[[0, REMOVED_COLOUR], [1, REMOVED_COLOUR]], text=hover,
        hovertemplate="%{text}<extra></extra>", name="removed"))
    if rows * cols <= NUMBERED_UP_TO:
        centres_x = [(a + b) / 2 for a, b in pairwise(xs)]
        centres_y = [(a + b) / 2 for a, b in pairwise(ys)]
        fig.add_trace(go.Scatter(
            x=centres_x * rows, y=[y for y in centres_y for _ in range(cols)], mode="text",
            text=[str(m) for m in range(rows * cols)], hoverinfo="skip", showlegend=False,
            textfont={"color": "white", "size": 12, "shadow": "1px 1px 2px black"}))
    shapes = [_box(b, BOX_TRUE) for b in true_boxes]
    if selection_box is not None:
        shapes.append(_box(selection_box, BOX_SELECTED, "dash"))
    if focus_patch is not None:
        shapes.append(_box(np.asarray(grid_boxes)[focus_patch], BOX_FOCUS))
    fig.update_layout(template=TEMPLATE, height=height, shapes=shapes, showlegend=False,
                      title=title, margin={"l": 5, "r": 5, "t": 40 if title else 5, "b": 5},
                      plot_bgcolor="white")
    fig.update_xaxes(range=[0, w], visible=False, constrain="domain")
    fig.update_yaxes(range=[h, 0], visible=False, scaleanchor="x", constrain="domain")
    return fig


def sorted_scores_figure(scores: Sequence[float], kept: Sequence[bool], cut: float | None,
                         score_name: str, cut_name: str, height: int = 300) -> go.Figure:
    """Every patch's score, largest first, on a log axis (the scores span decades), with the
    threshold's cut drawn across and the uniform share 1/M for reference: the bars above the
    cut survive; the patch numbers under the bars are the map's."""
    values = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-values, kind="stable")
    keep = np.asarray(kept, dtype=bool)
    positive = values[values > 0]
    floor = float(positive.min()) / 2 if positive.size else 1e-6
    fig = go.Figure(go.Bar(
        x=[str(m) for m in order], y=np.maximum(values[order], floor).tolist(),
        marker_color=[KEPT_COLOUR if keep[m] else REMOVED_COLOUR for m in order],
        customdata=values[order].tolist(),
        hovertemplate="patch %{x}<br>" + score_name + " = %{customdata:.5f}<extra></extra>"))
    # Lines with their labels placed by hand: plotly puts a line's own annotation at the wrong
    # height on a log axis (annotations there are in log10 units).
    uniform = 1.0 / len(values)
    fig.add_hline(y=uniform, line={"color": "#888", "width": 1, "dash": "dot"})
    fig.add_annotation(text="1/M (uniform)", x=1, xref="paper", y=math.log10(uniform),
                       yref="y", showarrow=False, xanchor="right", yanchor="bottom",
                       font={"color": "#666"})
    if cut:
        fig.add_hline(y=cut, line={"color": "#e45756", "width": 2, "dash": "dash"})
        fig.add_annotation(text=f"{cut_name} = {cut:.4f}: {int(keep.sum())} kept", x=1,
                           xref="paper", y=math.log10(cut), yref="y", showarrow=False,
                           xanchor="right", yanchor="top", font={"color": "#e45756"})
    else:
        text = ("no threshold: every patch is kept" if cut is None
                else f"{cut_name} = 0: every patch is kept")
        fig.add_annotation(text=text, xref="paper", yref="paper", x=1, y=1, showarrow=False,
                           xanchor="right")
    fig.update_xaxes(title_text="patch (largest first)", type="category", tickfont={"size": 9})
    fig.update_yaxes(title_text=f"{score_name}, log scale", type="log", dtick=1)
    fig.update_layout(template=TEMPLATE, height=height, showlegend=False, bargap=0.15,
                      margin={"l": 60, "r": 10, "t": 20, "b": 40})
    return fig


def breakdown_rows(breakdown, classes: Sequence[str], multilabel: bool = False) -> list[dict]:
    """Eq. 5 as a table to follow with a finger: each heavy patch's weight α_m, its logits O_m
    and its terms α_m·O_m; the other patches' terms summed; then z, the sum of each term column,
    and its softmax (``breakdown``: :class:`engine.explore.Breakdown`)."""
    names = [classes[k] for k in breakdown.classes]

    def row(term: str, weight, logits, terms) -> dict:
        # Text cells: a blank is blank (not "None"), and every number keeps its decimals.
        out = {"term": term, "α_m": "" if weight is None else f"{weight:.4f}"}
        for j, name in enumerate(names):
            out[f"O[{name}]"] = "" if logits is None else f"{logits[j]:.2f}"
        for j, name in enumerate(names):
            out[f"α·O[{name}]"] = "" if terms is None else f"{terms[j]:.2f}"
        return out

    rows = [row(f"patch {m}", a, o, [a * v for v in o])
            for m, a, o in zip(breakdown.patches, breakdown.weights, breakdown.logits,
                               strict=True)]
    if breakdown.rest_count:
        rows.append(row(f"the other {breakdown.rest_count} patches", breakdown.rest_weight, None,
                        breakdown.rest))
    rows.append(row("z = Σ α·O", sum(breakdown.weights) + breakdown.rest_weight, None,
                    breakdown.z))
    rows.append(row("sigmoid(z)" if multilabel else "softmax(z) over all classes", None, None,
                    breakdown.probabilities))
    return rows


def breakdown_latex(breakdown, classes: Sequence[str], multilabel: bool = False,
                    terms_shown: int = 4) -> str:
    """The predicted class's logit written out with the real numbers: the first
    ``terms_shown`` patches' α_m × O_m, the rest summed under a brace."""
    k = classes[breakdown.classes[0]]
    pairs = list(zip(breakdown.weights, [o[0] for o in breakdown.logits], strict=True))
    terms = [rf"{a:.3f}\times{o:.2f}" for a, o in pairs[:terms_shown]]
    rest = sum(a * o for a, o in pairs[terms_shown:]) + (breakdown.rest[0]
                                                          if breakdown.rest_count else 0.0)
    others = len(pairs[terms_shown:]) + breakdown.rest_count
    if others:
        terms.append(rf"\underbrace{{{rest:.2f}}}_{{\text{{other {others}}}}}")
    squash = r"\sigma" if multilabel else r"\mathrm{softmax}"
    return (rf"\begin{{aligned}} z_{{\text{{{k}}}}} &= \sum_m \alpha_m O_{{m,\text{{{k}}}}} = "
            + " + ".join(terms).replace("+ -", "- ")
            + rf" = {breakdown.z[0]:.2f} \\ {squash}(z)_{{\text{{{k}}}}} &= "
            rf"{breakdown.probabilities[0]:.3f} \end{{aligned}}")
