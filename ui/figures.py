"""Plotly figure builders for the pages (Streamlit-free, unit-tested directly).

One continuous colour scale (``COLORSCALE``, the same viridis as the overlays) for every heat map,
with fixed ranges for rates in [0, 1], so two heat maps side by side can be compared by colour;
one qualitative palette for runs and methods, assigned by name so a run keeps its colour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from engine.job_status import State

COLORSCALE = "Viridis"
PALETTE = qualitative.D3
TEMPLATE = "plotly_white"


def color_for(name: str, names: Sequence[str]) -> str:
    """A stable colour per name within a list (its position in the sorted list)."""
    order = sorted(set(names))
    return PALETTE[order.index(name) % len(PALETTE)] if name in order else PALETTE[0]


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _layout(fig: go.Figure, title: str | None = None, height: int = 360) -> go.Figure:
    fig.update_layout(template=TEMPLATE, title=title, height=height,
                      margin={"l": 50, "r": 20, "t": 50 if title else 20, "b": 40},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def training_curves(metrics: list[dict], metric_name: str = "test_acc") -> go.Figure:
    """Loss (train, and test where recorded) and the main metric against epoch, one run."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", metric_name))
    epochs = [r["epoch"] + 1 for r in metrics]
    series = [("train_loss", 1, PALETTE[0]), ("test_loss", 1, PALETTE[1]),
              ("train_acc", 2, PALETTE[0]), (metric_name, 2, PALETTE[1])]
    for key, col, colour in series:
        values = [r.get(key) for r in metrics]
        if any(_finite(v) for v in values):
            fig.add_trace(go.Scatter(x=epochs, y=values, name=key, mode="lines+markers",
                                     line={"color": colour}), row=1, col=col)
    fig.update_xaxes(title_text="epoch")
    return _layout(fig)


def metric_overlay(runs: dict[str, list[dict]], key: str) -> go.Figure:
    """One line per run of ``key`` against epoch (the Runs page's overlay)."""
    fig = go.Figure()
    names = list(runs)
    for name, rows in runs.items():
        fig.add_trace(go.Scatter(x=[r["epoch"] + 1 for r in rows], y=[r.get(key) for r in rows],
                                 name=name, mode="lines+markers",
                                 line={"color": color_for(name, names)}))
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text=key)
    return _layout(fig)


FIELD_LABELS = {"loss.gamma_max": "γmax", "model.xi": "ξ", "train.epochs": "epochs",
                "model.stride_plan": "stride plan", "train.seed": "seed"}
"""How swept config fields are named on axes."""


def grid_heatmap(groups: list[dict], x_field: str, y_field: str, value: str,
                 title: str | None = None, *, chance: float | None = None) -> go.Figure:
    """Heat map of ``value`` over two swept fields, one square cell per grid cell: its value
    written in it (mean ± sd where the cell has several seeds: the groups of
    :func:`engine.sweep.seed_groups`), and a cell without a value left blank with its runs'
    state written instead (failed, running, queued), never drawn as 0.

    One colour scale per metric over a stated range, never the values' own span (that drew
    0.13697 against 0.13702 as the darkest against the brightest colour): rates over [0, 1],
    counts over [0, their largest]. The best cell says ``best``; a cell whose seeds' range
    reaches into the best cell's says ``≈ best`` (its difference is within the seeds' spread);
    with ``chance`` (the accuracy of guessing), a cell at most 5 points above it says
    ``learned nothing`` (:func:`at_chance`)."""
    xs = sorted({json_key(r.get(x_field)) for r in groups}, key=_sort_key)
    ys = sorted({json_key(r.get(y_field)) for r in groups}, key=_sort_key)
    z = [[None] * len(xs) for _ in ys]
    text = [[""] * len(xs) for _ in ys]
    cells = {(ys.index(json_key(r.get(y_field))), xs.index(json_key(r.get(x_field)))): r
             for r in groups}
    values = [r[value] for r in groups if _finite(r.get(value))]
    best = max((r for r in groups if _finite(r.get(value))), key=lambda r: r[value],
               default=None)
    for (i, j), r in cells.items():
        v = r.get(value)
        if not _finite(v):
            text[i][j] = _states_text(r)
            continue
        z[i][j] = v
        sd = r.get(f"{value}_sd")
        lines = [f"{v:.3f}" + (f" ± {sd:.3f}" if _finite(sd) else "")]
        if r is best:
            lines.append("best")
        elif best is not None and _within_spread(r, best, value):
            lines.append("≈ best")
        if chance is not None and at_chance(v, chance):
            lines.append("learned nothing")
        text[i][j] = "<br>".join(lines)
    rate = bool(values) and all(0 <= v <= 1 for v in values)
    top = 1.0 if rate else max(values, default=1.0) or 1.0
    x_label, y_label = FIELD_LABELS.get(x_field, x_field), FIELD_LABELS.get(y_field, y_field)
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(x) for x in xs], y=[str(y) for y in ys], colorscale=COLORSCALE,
        zmin=0.0, zmax=top, text=text, texttemplate="%{text}", textfont={"size": 12},
        colorbar={"thickness": 12, "len": 0.9},
        hovertemplate=f"{x_label}=%{{x}}<br>{y_label}=%{{y}}<br>%{{text}}<extra></extra>"))
    fig.update_xaxes(title_text=x_label, type="category", constrain="domain")
    fig.update_yaxes(title_text=y_label, type="category", scaleanchor="x", constrain="domain")
    side = 100 * max(len(xs), len(ys))
    heading = f"{title or value} (colours: 0 to {top:g})"
    return _layout(fig, heading, height=min(560, max(320, side + 130)))


CHANCE_MARGIN = 0.05


def at_chance(accuracy: float, chance: float) -> bool:
    """Whether an accuracy is no better than guessing: at most 5 points above it (0.15 for ten
    classes, 0.55 for two; a margin in points, not a factor, so that few classes are judged
    as strictly as many)."""
    return accuracy <= chance + CHANCE_MARGIN


def _within_spread(cell: dict, best: dict, value: str) -> bool:
    """Whether ``cell``'s seed values reach the lowest of the best cell's (both with two or
    more seeds): the two differ by less than the seeds themselves do."""
    mine, theirs = cell.get(f"{value}_values") or [], best.get(f"{value}_values") or []
    return len(mine) > 1 and len(theirs) > 1 and max(mine) >= min(theirs)


def _states_text(group: dict) -> str:
    """A cell without a value: what its runs are doing (``2 running, 1 failed``)."""
    states = {k: n for k, n in (group.get("states") or {}).items() if k != State.FINISHED}
    return ", ".join(f"{n} {k}" if n > 1 else k for k, n in states.items()) or "no value"


def json_key(value):
    """A hashable, printable form of a config value (lists become tuples)."""
    return tuple(value) if isinstance(value, list) else value


def _sort_key(value):
    return (0, value, "") if isinstance(value, int | float) else (1, 0, str(value))


def pr_figure(curves: dict, title: str, classes: Sequence[str] | None = None) -> go.Figure:
    """Precision against recall: the overall curve (bold) and the chosen classes' curves, with
    AP in each legend entry."""
    fig = go.Figure()
    per_class = curves.get("per_class", [])
    names = [c["class"] for c in per_class]
    for curve in per_class:
        if classes is not None and curve["class"] not in classes:
            continue
        fig.add_trace(go.Scatter(x=curve["recall"], y=curve["precision"], mode="lines",
                                 name=f"{curve['class']} (AP {curve['ap']:.3f})",
                                 line={"color": color_for(curve["class"], names), "width": 1.5}))
    overall = curves.get("overall")
    if overall and overall.get("recall"):
        fig.add_trace(go.Scatter(x=overall["recall"], y=overall["precision"], mode="lines",
                                 name=f"overall (AP {overall['ap']:.3f})",
                                 line={"color": "black", "width": 3}))
    fig.update_xaxes(title_text="recall", range=[0, 1.02])
    fig.update_yaxes(title_text="precision", range=[0, 1.02])
    return _layout(fig, title, height=420)


def patch_bars(values: Sequence[float], weights: Sequence[float], selected: Sequence[bool],
               label: str) -> go.Figure:
    """Per-patch values (e.g. the logit for one class), coloured by weight; selected patches
    outlined."""
    fig = go.Figure(go.Bar(
        x=list(range(len(values))), y=list(values),
        marker={"color": list(weights), "colorscale": COLORSCALE, "cmin": 0,
                "cmax": max(max(weights, default=0), 1e-9), "colorbar": {"title": "weight"},
                "line": {"color": ["black" if s else "rgba(0,0,0,0)" for s in selected],
                         "width": 1.5}},
        hovertemplate="patch %{x}<br>" + label + " %{y:.3f}<extra></extra>"))
    fig.update_xaxes(title_text="patch (row-major)")
    fig.update_yaxes(title_text=label)
    return _layout(fig, height=300)


def stride_time_figure(rows: list[dict]) -> go.Figure:
    """Accuracy against seconds per epoch, one point per plan; marker size by peak memory
    where the rows have a per-plan figure (CUDA), else one size."""
    fig = go.Figure()
    points = [r for r in rows if _finite(r.get("epoch_s")) and _finite(r.get("accuracy"))]
    memory = [r.get("memory_mb") for r in points]
    top = max((m for m in memory if m), default=0) or 1
    names = [str(r["plan"]) for r in points]
    for r, mem in zip(points, memory, strict=True):
        fig.add_trace(go.Scatter(
            x=[r["epoch_s"]], y=[r["accuracy"]], mode="markers+text", text=[str(r["plan"])],
            textposition="top center", name=str(r["plan"]),
            marker={"size": 12 + 30 * mem / top if mem else 16,
                    "color": color_for(str(r["plan"]), names)},
            hovertemplate=f"plan {r['plan']}<br>%{{x:.1f}} s/epoch<br>accuracy %{{y:.4f}}"
            + (f"<br>memory {mem:.0f} MB" if mem else "") + "<extra></extra>"))
    fig.update_xaxes(title_text="seconds per epoch (this machine)")
    fig.update_yaxes(title_text="test accuracy")
    return _layout(fig, height=380)


def bench_figure(rows: list[dict]) -> go.Figure:
    """Images/s (bars) and peak memory (markers, right axis) per stride plan."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    plans = [str(r["plan"]) for r in rows]
    fig.add_trace(go.Bar(x=plans, y=[r.get("images_per_s") for r in rows], name="images/s",
                         marker_color=PALETTE[0]), secondary_y=False)
    fig.add_trace(go.Scatter(x=plans, y=[r.get("memory_mb") for r in rows], name="peak MB",
                             mode="markers", marker={"size": 12, "color": PALETTE[1]}),
                  secondary_y=True)
    fig.update_yaxes(title_text="forward+backward images/s", secondary_y=False)
    fig.update_yaxes(title_text="peak memory (MB)", secondary_y=True)
    fig.update_xaxes(title_text="stride plan", type="category")
    return _layout(fig, height=340)


def bag_weights_figure(bag: dict) -> go.Figure:
    """A MIL bag's instance weights as bars; the key (target) instances in red where known."""
    weights = bag["weights"]
    labels = bag.get("instance_labels")
    if labels is None:
        colours, names = ["#4c78a8"] * len(weights), None
    else:
        colours = ["#e45756" if v else "#9d9d9d" for v in labels]
        names = ["key instance" if v else "other" for v in labels]
    fig = go.Figure(go.Bar(x=list(range(len(weights))), y=weights, marker_color=colours,
                           hovertext=names))
    fig.add_hline(y=1.0 / len(weights), line_dash="dot",
                  annotation_text="uniform 1/N", annotation_position="top right")
    fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      xaxis_title="instance", yaxis_title="weight α", showlegend=False)
    return fig


def local_maps_figure(maps: Sequence, rho: Sequence, titles: Sequence[str]) -> go.Figure:
    """Mutual transfer's view of one image: each peer's global map (all on one colour scale,
    ``maps`` (K, S, S) in [0, 1]) with the local-region grid drawn over it, and the per-region
    Pearson ρ of each peer against peer 0 (``rho`` (K - 1, g, g)), written in its cell."""
    k, grid = len(maps), len(rho[0])
    side = len(maps[0])
    fig = make_subplots(rows=1, cols=2 * k - 1, horizontal_spacing=0.05, subplot_titles=[
        *titles, *[f"ρ per region, peer {j} vs 0" for j in range(1, k)]])
    for i, m in enumerate(maps):
        fig.add_trace(go.Heatmap(z=m, coloraxis="coloraxis", hovertemplate="%{z:.3f}<extra>"
                                 "</extra>"), row=1, col=i + 1)
        for edge in range(1, grid):  # the local regions, on the map itself
            at = edge * side / grid - 0.5
            fig.add_vline(x=at, line={"color": "white", "width": 1}, row=1, col=i + 1)
            fig.add_hline(y=at, line={"color": "white", "width": 1}, row=1, col=i + 1)
    for j, r in enumerate(rho):
        fig.add_trace(go.Heatmap(z=r, zmin=-1, zmax=1, colorscale="RdBu", showscale=j == 0,
                                 text=[[f"{v:.2f}" for v in row] for row in r],
                                 texttemplate="%{text}", hovertemplate="ρ %{z:.3f}<extra></extra>",
                                 colorbar={"title": "ρ", "len": 0.9}),
                      row=1, col=k + j + 1)
    fig.update_layout(coloraxis={"colorscale": COLORSCALE, "cmin": 0, "cmax": 1,
                                 "colorbar": {"title": "map", "orientation": "h", "y": -0.12,
                                              "x": (k / (2 * k - 1)) / 2,
                                              "len": k / (2 * k - 1), "thickness": 12}})
    fig.update_xaxes(showticklabels=False)
    for col in range(1, 2 * k):  # square cells, image orientation (row 0 at the top)
        fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=col,
                         scaleanchor="x" if col == 1 else f"x{col}", constrain="domain")
        fig.update_xaxes(constrain="domain", row=1, col=col)
    return _layout(fig, height=380)


def transfer_table(summary: list[dict], labels: dict[str, str],
                   reference: dict | None = None) -> list[dict]:
    """The mutual-vs-alone summary rows as a table for the page (rounded, labelled); with
    ``reference`` (metric -> the seed paper's value), a column of those values."""
    rows = []
    for r in summary:
        digits = 1 if r["metric"].endswith("_pct") else 3

        def cell(mean, std, digits=digits):
            if mean is None:
                return ""
            return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")

        rows.append({"map": labels.get(r["method"], r["method"]), "metric": r["metric"],
                     "mutual": cell(r["mutual_mean"], r["mutual_std"]),
                     "alone": cell(r["alone_mean"], r["alone_std"]),
                     "mutual - alone": cell(r["difference_mean"], r["difference_std"]),
                     "seeds better": f"{r['seeds_better']}/{r['seeds']}"})
        if reference is not None:
            value = reference.get(r["metric"])
            rows[-1]["seed paper (its setting)"] = "" if value is None else f"{value:.1f}"
    return rows


def stride_sketch_figure(plans: Sequence[tuple[str, object]], size: tuple[int, int]
                         ) -> go.Figure:
    """What each stride plan does to the patch grid: the input square with the cells of its
    patches (one per patch, around the patch centres), and the full pixel box that the centre
    patch sees, drawn over it. ``plans``: (label, :class:`engine.models.geometry.PatchGrid`)."""
    from engine.pictures import cell_edges

    h, w = size
    fig = make_subplots(rows=1, cols=len(plans), horizontal_spacing=0.04, subplot_titles=[
        f"{label}: {g.rows}x{g.cols} = {g.num_patches} patches" for label, g in plans])
    for col, (_, grid) in enumerate(plans, start=1):
        xs, ys = cell_edges(grid.boxes.numpy(), grid.rows, grid.cols, (h, w))
        centre = (grid.rows // 2) * grid.cols + grid.cols // 2
        x0, y0, x1, y1 = (float(v) for v in grid.boxes[centre].tolist())
        lines_x = [v for x in xs for v in (x, x, None)]
        lines_y = [v for _ in xs for v in (0, h, None)]
        lines_x += [v for _ in ys for v in (0, w, None)]
        lines_y += [v for y in ys for v in (y, y, None)]
        fig.add_trace(go.Scatter(x=lines_x, y=lines_y, mode="lines", hoverinfo="skip",
                                 line={"color": "#9d9d9d", "width": 1}), row=1, col=col)
        fig.add_trace(go.Scatter(
            x=[x0, x1, x1, x0, x0], y=[y0, y0, y1, y1, y0], mode="lines", fill="toself",
            line={"color": PALETTE[3], "width": 2}, fillcolor="rgba(214,39,40,0.15)",
            hovertemplate=f"patch {centre} sees x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} "
            f"({x1 - x0:.0f}x{y1 - y0:.0f} px)<extra></extra>"), row=1, col=col)
        fig.update_xaxes(range=[0, w], showticklabels=False, row=1, col=col,
                         constrain="domain")
        fig.update_yaxes(range=[h, 0], showticklabels=False, row=1, col=col,
                         scaleanchor="x" if col == 1 else f"x{col}", constrain="domain")
    fig.update_layout(showlegend=False)
    return _layout(fig, height=300)


GAMMA_PANELS = (("accuracy", "test accuracy"), ("precision_paper", "patch precision (paper)"),
                ("recall_paper", "patch recall (paper)"), ("f_paper", "patch F (paper)"),
                ("gt_known_loc", "GT-known localization"),
                ("patches_per_image", "patches kept per image"))


def gamma_effects(entries: list[dict], current: float | None = None) -> go.Figure:
    """*What γmax does*: one small panel per measure against γmax (evenly spaced categories:
    the family's values step by about x3), the seeds' mean as a marker and their range (lowest
    to highest) as its error bar; ``current`` (this model's γmax) is drawn in another colour.
    Rates on [0, 1], patches on [0, all of them]: the axes do not zoom into noise."""
    fig = make_subplots(rows=2, cols=3, subplot_titles=[label for _, label in GAMMA_PANELS],
                        horizontal_spacing=0.08, vertical_spacing=0.2)
    xs = [f"{e['gamma_max']:g}" for e in entries]
    colours = [PALETTE[1] if current is not None and e["gamma_max"] == current else PALETTE[0]
               for e in entries]
    for n, (key, label) in enumerate(GAMMA_PANELS):
        row, col = n // 3 + 1, n % 3 + 1
        means = [e.get(key) for e in entries]
        fig.add_trace(go.Scatter(
            x=xs, y=means, mode="lines+markers", name=label, showlegend=False,
            line={"color": "#999", "width": 1}, marker={"color": colours, "size": 9},
            error_y={"type": "data", "symmetric": False, "thickness": 1.5,
                     "array": [e[f"{key}_max"] - e[key] if key in e else None
                               for e in entries],
                     "arrayminus": [e[key] - e[f"{key}_min"] if key in e else None
                                    for e in entries]},
            hovertemplate="γmax %{x}<br>" + label + " %{y:.3f}<extra></extra>"), row=row, col=col)
        top = max((e.get(f"{key}_max") or 0 for e in entries), default=1)
        fig.update_yaxes(range=[0, 1.02] if key != "patches_per_image" else [0, top * 1.05],
                         row=row, col=col)
    fig.update_xaxes(type="category", title_text="γmax", title_standoff=2)
    fig.update_annotations(font_size=13)
    return _layout(fig, height=430)
