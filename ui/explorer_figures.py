"""The Patch Explorer's pictures: the patch map over the image and the sorted scores with ξ's cut.

SVG markup built here and drawn by the browser. Both are redrawn on every ξ move, and as plotly
charts they were rebuilt from scratch each time (Streamlit gives a chart a new identity when its
figure changes): that, not the server, was most of a move's latency. The colour scale is the
fixed √α scale of :mod:`engine.pictures`, the PNG download's colours, so colours compare across
images and ξ. Streamlit-free, so the builders are unit-tested directly.
"""

from __future__ import annotations

import base64
import functools
import math
import re
from collections.abc import Sequence
from html import escape

import numpy as np
from PIL import Image

from engine.pictures import (
    BOX_FOCUS,
    BOX_SELECTED,
    BOX_TRUE,
    NUMBERED_UP_TO,
    REMOVED_GREY,
    WEIGHT_TICKS,
    cell_edges,
    colorize,
    png_bytes,
    weight_colour_value,
)

KEPT_COLOUR = "#3b528b"  # viridis' blue: a kept patch's bar
REMOVED_COLOUR = "rgb({},{},{})".format(*REMOVED_GREY)
UPSCALE = 8  # a plotly image is sent enlarged (nearest), so the browser never blurs its pixels


def image_source(image: np.ndarray, upscale: int = 1) -> str:
    """An (H, W, 3) uint8 image as a PNG data URI, enlarged ``upscale`` times (nearest). The
    SVG maps send it at its own size and draw it with ``image-rendering: pixelated``; a plotly
    image would be blurred, so the Compare page's maps send it enlarged ``UPSCALE`` times."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    return _png_uri(image.tobytes(), image.shape, upscale)


@functools.lru_cache(maxsize=64)
def _png_uri(pixels: bytes, shape: tuple[int, ...], upscale: int) -> str:
    # Cached: every ξ move redraws the same image.
    image = Image.fromarray(np.frombuffer(pixels, np.uint8).reshape(shape))
    if upscale > 1:
        h, w = shape[:2]
        image = image.resize((w * upscale, h * upscale), Image.Resampling.NEAREST)
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def _rgb(colour: tuple[int, int, int]) -> str:
    return "rgb({},{},{})".format(*colour)


def patch_map_svg(image: np.ndarray, grid_boxes: np.ndarray, rows: int, cols: int,
                  weights: Sequence[float], kept: Sequence[bool], *,
                  true_boxes: Sequence = (), selection_box=None, focus_patch: int | None = None,
                  title: str | None = None, height: int = 430, colour_bar: bool = True,
                  name: str = "map") -> str:
    """The patch map as SVG markup: the image with each patch's cell tinted by its weight on
    the fixed √α scale (the colours of the PNG download), removed patches greyed out, every
    patch's number in its cell (grids up to ``NUMBERED_UP_TO`` patches), the true boxes red, the
    selected patches' box dashed blue, a focused patch white; a colour bar. The root is marked
    ``data-map=name`` and each cell carries its patch number and layer (``g.kept`` /
    ``g.removed``), for the page's tests.

    SVG rather than a plotly chart because of the ξ slider: Streamlit gives a plotly chart a new
    identity whenever its figure changes, so every move tore the map down and built it again in
    the browser (with the sorted scores, about 125 of a 240 ms move here, measured by leaving
    the charts out). The page shows it as an image: drawn as markup it went through Streamlit's
    markdown parser (37 ms of a move's browser time in a CDP profile).
    Units are screen pixels: the image is drawn ``height`` pixels tall (less the title band)."""
    h, w = image.shape[:2]
    top = 26 if title else 0
    scale = (height - top) / h
    bar = 70 if colour_bar else 0
    xs, ys = (edges * scale for edges in cell_edges(grid_boxes, rows, cols, (h, w)))
    alpha = np.asarray(weights, dtype=np.float64)
    keep = np.asarray(kept, dtype=bool)
    fills = colorize(weight_colour_value(alpha))
    cells = {True: [], False: []}
    for m in range(rows * cols):
        r, c = divmod(m, cols)
        fill = _rgb(tuple(fills[m])) if keep[m] else REMOVED_COLOUR
        cells[bool(keep[m])].append(
            f'<rect x="{xs[c]:.2f}" y="{ys[r] + top:.2f}" width="{xs[c + 1] - xs[c]:.2f}" '
            f'height="{ys[r + 1] - ys[r]:.2f}" fill="{fill}" data-patch="{m}"/>')
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" data-map="{escape(name)}" '
              f'width="{w * scale + bar:.0f}" '
             f'height="{height}" viewBox="0 0 {w * scale + bar:.2f} {height}" role="img" '
             f'aria-label="{escape(_summary(keep))}" style="max-width:100%;height:auto">')]
    if title:
        parts.append(f'<text x="0" y="17" font-size="15" font-family="sans-serif">'
                     f"{escape(title)}</text>")
    parts.append(f'<image href="{image_source(image)}" x="0" y="{top}" width="{w * scale:.2f}" '
                 f'height="{h * scale:.2f}" preserveAspectRatio="none" '
                 'style="image-rendering:pixelated"/>')
    parts.append(f'<g class="kept" fill-opacity="0.55">{"".join(cells[True])}</g>')
    parts.append(f'<g class="removed" fill-opacity="0.75">{"".join(cells[False])}</g>')
    if rows * cols <= NUMBERED_UP_TO:
        size = min(12.0, 0.45 * float(min(np.diff(xs).min(), np.diff(ys).min())))
        numbers = "".join(
            f'<text x="{(xs[c] + xs[c + 1]) / 2:.2f}" y="{(ys[r] + ys[r + 1]) / 2 + top:.2f}">'
            f"{r * cols + c}</text>" for r in range(rows) for c in range(cols))
        parts.append(f'<g class="numbers" font-size="{size:.1f}" font-family="sans-serif" '
                     'fill="white" stroke="black" stroke-width="2" paint-order="stroke" '
                     'text-anchor="middle" dominant-baseline="central" pointer-events="none">'
                     f"{numbers}</g>")
    boxes = [(b, BOX_TRUE, "") for b in true_boxes]
    if selection_box is not None:
        boxes.append((selection_box, BOX_SELECTED, "8 5"))
    if focus_patch is not None:
        boxes.append((np.asarray(grid_boxes)[focus_patch], BOX_FOCUS, ""))
    parts.append('<g class="boxes" fill="none" stroke-width="3" pointer-events="none">'
                 + "".join(_svg_box(b, colour, dash, scale, top) for b, colour, dash in boxes)
                 + "</g>")
    if colour_bar:
        parts.append(_colour_bar(w * scale + 14, top + 0.05 * (height - top),
                                 0.9 * (height - top)))
    parts.append("</svg>")
    return "".join(parts)


def svg_width(markup: str) -> int:
    """The pixel width an SVG built here declares (its root's ``width``)."""
    match = re.match(r'<svg [^>]*?width="([0-9.]+)"', markup)
    if match is None:
        raise ValueError("not an SVG root with a width")
    return round(float(match.group(1)))


def _summary(keep: np.ndarray) -> str:
    return f"patch map: {int(keep.sum())} of {keep.size} patches kept"


def _svg_box(box, colour, dash: str, scale: float, top: float) -> str:
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    pattern = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<rect x="{x0:.2f}" y="{y0 + top:.2f}" width="{x1 - x0:.2f}" height="{y1 - y0:.2f}" '
            f'stroke="{_rgb(colour)}"{pattern}/>')


def _colour_bar(x: float, y: float, length: float, thickness: float = 14) -> str:
    """The √α colour bar: the colour scale bottom (α = 0) to top (α = 1), ticks at
    ``WEIGHT_TICKS``, the same positions as the fill colours."""
    stops = colorize(np.linspace(0, 1, 11))
    gradient = "".join(f'<stop offset="{k / 10:.1f}" stop-color="{_rgb(tuple(c))}"/>'
                       for k, c in enumerate(stops))
    ticks = "".join(
        f'<text x="{x + thickness + 4:.2f}" y="{y + length * (1 - v):.2f}">{t:g}</text>'
        for t, v in zip(WEIGHT_TICKS, weight_colour_value(WEIGHT_TICKS), strict=True))
    return (f'<g class="colour-bar"><defs><linearGradient id="alpha-scale" x1="0" y1="1" x2="0" '
            f'y2="0">{gradient}</linearGradient></defs>'
            f'<rect x="{x:.2f}" y="{y:.2f}" width="{thickness}" height="{length:.2f}" '
            'fill="url(#alpha-scale)"/>'
            f'<text x="{x:.2f}" y="{y - 6:.2f}" font-size="13" font-family="sans-serif">α</text>'
            '<g font-size="11" font-family="sans-serif" fill="#444" '
            f'dominant-baseline="central">{ticks}</g></g>')


def sorted_scores_svg(scores: Sequence[float], kept: Sequence[bool], cut: float | None,
                      score_name: str, cut_name: str, width: int = 380, height: int = 300,
                      name: str = "scores") -> str:
    """Every patch's score as a bar, largest first, on a log axis (the scores span decades),
    with the threshold's cut drawn across and the uniform share 1/M for reference: the bars
    above the cut survive (blue), the rest are grey; the patch numbers under the bars are the
    map's (every other one when they would not fit). SVG for the reason :func:`patch_map_svg`
    gives: it is redrawn on every ξ move. The root is marked ``data-map=name``."""
    values = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-values, kind="stable")
    keep = np.asarray(kept, dtype=bool)
    positive = values[values > 0]
    floor = float(positive.min()) / 2 if positive.size else 1e-6
    uniform = 1.0 / len(values)
    drawn = np.maximum(values[order], floor)
    levels = [float(v) for v in (*drawn, uniform, cut or uniform)]
    low = math.floor(math.log10(min(levels)))
    high = max(math.ceil(math.log10(max(levels))), low + 1)
    left, right, top, bottom = 60, 10, 20, 40
    plot_w, plot_h = width - left - right, height - top - bottom

    def y_of(value: float) -> float:
        return top + plot_h * (high - math.log10(value)) / (high - low)

    band = plot_w / len(values)
    every = max(1, math.ceil(len(values) * 12 / plot_w))  # patch labels that fit side by side
    bars, labels = [], []
    for i, (m, value) in enumerate(zip(order.tolist(), drawn.tolist(), strict=True)):
        x, y = left + i * band + 0.075 * band, y_of(value)
        fill = KEPT_COLOUR if keep[m] else REMOVED_COLOUR
        bars.append(f'<rect x="{x:.2f}" y="{y:.2f}" width="{0.85 * band:.2f}" '
                    f'height="{top + plot_h - y:.2f}" fill="{fill}" data-patch="{m}" '
                    f'data-score="{values[m]:.6g}"/>')
        if i % every == 0:
            labels.append(f'<text x="{left + (i + 0.5) * band:.2f}" y="{top + plot_h + 12}">'
                          f"{m}</text>")
    grid = "".join(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{y_of(10.0 ** k):.2f}" '
        f'y2="{y_of(10.0 ** k):.2f}"/>' for k in range(low, high + 1))
    ticks = "".join(f'<text x="{left - 6}" y="{y_of(10.0 ** k):.2f}">{10.0 ** k:g}</text>'
                    for k in range(low, high + 1))
    lines = [_svg_hline(left, plot_w, y_of(uniform), "#888", 1, "2 3", "1/M (uniform)", "#666",
                        above=True)]
    if cut:
        lines.append(_svg_hline(left, plot_w, y_of(cut), "#e45756", 2, "7 4",
                                f"{cut_name} = {cut:.4f}: {int(keep.sum())} kept", "#e45756",
                                above=False))
    else:
        text = ("no threshold: every patch is kept" if cut is None
                else f"{cut_name} = 0: every patch is kept")
        lines.append(f'<text class="note" x="{left + plot_w}" y="{top - 6}" text-anchor="end">'
                     f"{escape(text)}</text>")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" data-map="{escape(name)}" '
            f'width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif" '
            f'aria-label="{escape(f"{score_name} of every patch, largest first")}" '
            'style="max-width:100%;height:auto">'
            f'<g class="grid" stroke="#eee">{grid}</g>'
            f'<g class="bars">{"".join(bars)}</g>'
            f'<g class="x-labels" font-size="9" fill="#444" text-anchor="middle">'
            f'{"".join(labels)}</g>'
            f'<g class="y-ticks" font-size="11" fill="#444" text-anchor="end" '
            f'dominant-baseline="central">{ticks}</g>'
            f'<g class="lines" font-size="12">{"".join(lines)}</g>'
            f'<text x="{left + plot_w / 2}" y="{height - 6}" font-size="12" text-anchor="middle">'
            "patch (largest first)</text>"
            f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" font-size="12" '
            f'text-anchor="middle">{escape(f"{score_name}, log scale")}</text></svg>')


def _svg_hline(left: float, length: float, y: float, colour: str, width: float, dash: str,
               label: str, label_colour: str, above: bool) -> str:
    """A line across the plot at height ``y`` with its label at the right end, above or below."""
    label_y = y - 4 if above else y + 13
    return (f'<line x1="{left}" x2="{left + length}" y1="{y:.2f}" y2="{y:.2f}" '
            f'stroke="{colour}" stroke-width="{width}" stroke-dasharray="{dash}"/>'
            f'<text x="{left + length}" y="{label_y:.2f}" text-anchor="end" '
            f'fill="{label_colour}">{escape(label)}</text>')


def breakdown_rows(breakdown, classes: Sequence[str], multilabel: bool = False, *,
                   removed: int) -> list[dict]:
    """Eq. 5 as a table to follow with a finger: each heavy patch's weight α_m, its logits O_m
    and its terms α_m·O_m; the other kept patches' terms summed; the ``removed`` patches (the
    threshold set their α to 0, so they add 0), apart from the kept ones; then z, the sum of
    each term column, and its softmax (``breakdown``: :class:`engine.explore.Breakdown`, whose
    ``rest`` holds the kept and the removed patches together)."""
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
    kept = _kept_rest(breakdown, removed)
    if kept:
        rows.append(row(f"the other {_patches(kept)} kept, summed", breakdown.rest_weight, None,
                        breakdown.rest))
    if removed:
        rows.append(row(f"the {_patches(removed)} removed", 0.0, None, [0.0] * len(names)))
    rows.append(row("z = Σ α·O", sum(breakdown.weights) + breakdown.rest_weight, None,
                    breakdown.z))
    rows.append(row("sigmoid(z)" if multilabel else "softmax(z) over all classes", None, None,
                    breakdown.probabilities))
    return rows


def _patches(count: int) -> str:
    return f"{count} patch" if count == 1 else f"{count} patches"


def _kept_rest(breakdown, removed: int) -> int:
    """How many of the breakdown's other patches the threshold kept (α > 0)."""
    if not 0 <= removed <= breakdown.rest_count:
        raise ValueError(f"removed must be in 0..{breakdown.rest_count}; got {removed}")
    return breakdown.rest_count - removed


def _number(value: float) -> str:
    """``value`` to 2 decimals; one that rounds to zero is 0.00, unsigned."""
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def _factor(value: float) -> str:
    """:func:`_number` as a factor or a term: a negative one in brackets ("0.300 × (−2.00)",
    never "0.300 × −2.00")."""
    text = _number(value)
    return f"({text})" if text.startswith("-") else text


def _product(weight: float, logit: float) -> str:
    return rf"{weight:.3f}\times{_factor(logit)}"


def breakdown_latex(breakdown, classes: Sequence[str], multilabel: bool = False, *,
                    removed: int, terms_shown: int = 4, per_line: int = 2) -> str:
    """The predicted class's logit written out with the real numbers: the first
    ``terms_shown`` patches' α_m × O_m, the other kept patches summed under a brace, the
    ``removed`` ones as the 0 they add; ``per_line`` terms to a line, so that the sum wraps
    inside a narrow column (a projector's 1366 px wide page gives it about 530 px) instead of
    running off its right edge."""
    k = classes[breakdown.classes[0]]
    pairs = list(zip(breakdown.weights, [o[0] for o in breakdown.logits], strict=True))
    terms = [_product(a, o) for a, o in pairs[:terms_shown]]
    others = len(pairs[terms_shown:]) + _kept_rest(breakdown, removed)
    if others:
        rest = sum(a * o for a, o in pairs[terms_shown:]) + (breakdown.rest[0]
                                                              if breakdown.rest_count else 0.0)
        terms.append(rf"\underbrace{{{_factor(rest)}}}_{{\text{{other {others} kept}}}}")
    if removed:
        terms.append(rf"\underbrace{{0}}_{{\text{{{removed} removed}}}}")
    lines = [" + ".join(terms[i:i + per_line]) for i in range(0, len(terms), per_line)]
    squash = r"\sigma" if multilabel else r"\mathrm{softmax}"
    return (rf"\begin{{aligned}} z_{{\text{{{k}}}}} &= \sum_m \alpha_m O_{{m,\text{{{k}}}}} \\ "
            + r" \\ &\quad + ".join([rf"&= {lines[0]}", *lines[1:]])
            + rf" \\ &= {_number(breakdown.z[0])} \\ {squash}(z)_{{\text{{{k}}}}} &= "
            # The trailing space holds KaTeX's 2 px spacer after a multi-line block (.vlist-s),
            # which would otherwise leave the block 2 px wider than its box: a sideways scroll.
            rf"{breakdown.probabilities[0]:.3f} \end{{aligned}}\;")
