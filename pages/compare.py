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

from engine.explain import (
    DEFAULT_MASK,
    MASKS,
    METHODS,
    ONE_PASS,
    RANDOM_DRAWS,
    REFERENCES,
    compare_maps,
    faithfulness,
    remembered_maps,
)
from engine.intervals import BOOTSTRAP_REPS, BOOTSTRAP_SEED, method_differences
from engine.metric_table import metrics_of
from engine.pictures import to_hwc
from engine.sanity import (
    CONFIDENCE,
    CRITERION,
    PASS_BELOW,
    cascade_maps,
    cascade_similarity,
    join_cascades,
    summarise_steps,
    verdict,
)
from ui.compare_figures import cascade_figure, deletion_insertion_figure, map_grid_figure
from ui.st_guards import guard
from ui.st_links import ensure_router
from ui.st_models import loaded_model, map_memo, require_model_path, test_set
from ui.st_session import keep
from ui.tables import markdown_table

COLUMNS = {m.key: m.short_heading for m in metrics_of("faithfulness")}
ON_DEMAND = "scorecam"
SIZES = [16, 32, 64, 128, 256]
SANITY_SIZES = [16, 32, 64, 128]
SANITY_PART = 16  # images per part of the sanity check (one progress step, one cache entry)
VERDICT_COLOURS = {"passes": "green", "fails": "red", "unclear": "orange"}


@st.cache_data(show_spinner="Computing the maps...", max_entries=16)
def _maps(path: str, mtime_ns: int, start: int, count: int, class_choice: str,
          methods: tuple[str, ...], xi: float) -> dict:
    del mtime_ns
    loaded = loaded_model(path)
    data = test_set(loaded.data_config)
    indices = torch.arange(start, min(start + count, len(data)))
    with loaded.lock:  # Score-CAM's hooks attach to this shared model
        return compare_maps(loaded.model, data, indices, class_choice, methods, xi)


def score_cam(loaded, result: dict, xi: float) -> np.ndarray:
    """Score-CAM of the images shown: those seen before (at this ξ) from the memo, the rest in
    one batch."""
    with loaded.lock, st.spinner("Computing Score-CAM (a forward pass per feature channel and "
                                 "image)..."):
        return remembered_maps(map_memo(loaded, f"{ON_DEMAND}@{xi:.2f}"), loaded.model,
                               test_set(loaded.data_config), result["indices"],
                               result["classes"], ON_DEMAND, xi=xi)


@st.cache_data(show_spinner=False, max_entries=64)
def _faithfulness(path: str, mtime_ns: int, count: int, method: str | None, xi: float,
                  class_choice: str, mask: str = DEFAULT_MASK) -> dict:
    """One method's row; ``method`` None: the reference maps' rows (no method)."""
    del mtime_ns
    loaded = loaded_model(path)
    data = test_set(loaded.data_config)
    indices = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]
    methods, references = ([], list(REFERENCES)) if method is None else ([method], [])
    with loaded.lock:
        return faithfulness(loaded.model, data, torch.device("cpu"), indices.sort().values,
                            methods, xi=xi, choice=class_choice, mask=mask,
                            references=references, draws=RANDOM_DRAWS)


def draw_maps(loaded, data, result: dict, shown: list[str], xi: float) -> None:
    """One figure: a row per image, the image then each method's map on one colour scale,
    the true boxes drawn. The one-pass maps are drawn first; with Score-CAM asked for, the
    figure is drawn again once its maps are made."""
    images = [to_hwc(data.images[i]) for i in result["indices"]]
    titles = [f"#{i}: predicted {data.classes[p]}, explaining {data.classes[c]}"
              for i, p, c in zip(result["indices"], result["predicted"], result["classes"],
                                 strict=True)]
    boxes = [[tuple(b[1:].tolist()) for b in data.boxes(i) if int(b[0]) == c]
             if data.has_boxes else [] for i, c in zip(result["indices"], result["classes"],
                                                       strict=True)]
    slot = st.empty()
    fast = {METHODS[m]: result["maps"][m] for m in shown if m != ON_DEMAND}
    if fast:
        slot.plotly_chart(map_grid_figure(images, fast, titles, boxes), key="cm_maps_fast",
                          config={"displayModeBar": False})
    if ON_DEMAND in shown:
        maps = {METHODS[m]: (score_cam(loaded, result, xi) if m == ON_DEMAND
                             else result["maps"][m]) for m in shown}
        slot.plotly_chart(map_grid_figure(images, maps, titles, boxes), key="cm_maps",
                          config={"displayModeBar": False})


@st.cache_data(show_spinner="Randomising the model, layer by layer...", max_entries=16)
def _cascade(path: str, mtime_ns: int, index: int, class_choice: str, methods: tuple[str, ...],
             xi: float) -> dict:
    del mtime_ns
    loaded = loaded_model(path)
    with loaded.lock:
        return cascade_maps(loaded.model, test_set(loaded.data_config), [index], class_choice,
                            methods, xi)


@st.cache_data(show_spinner=False, max_entries=64)
def _cascade_part(path: str, mtime_ns: int, indices: tuple[int, ...], class_choice: str,
                  methods: tuple[str, ...], xi: float) -> dict:
    """One part of the sample's cascade: kept, so that a larger sample (whose first parts are
    the smaller sample's) and a second look cost only the parts not seen yet."""
    del mtime_ns
    loaded = loaded_model(path)
    with loaded.lock:
        return cascade_similarity(loaded.model, test_set(loaded.data_config), list(indices),
                                  class_choice, methods, xi)


def sample_cascade(path: str, mtime: int, size: int, count: int, class_choice: str,
                   methods: tuple[str, ...], xi: float) -> dict:
    """The cascade over the first ``count`` images of a fixed random order of the test set,
    :data:`SANITY_PART` images at a time under a progress bar (16 digits take about a second
    on a laptop's CPU; a large backbone takes longer)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(0))[:count].tolist()
    parts = [tuple(order[k:k + SANITY_PART]) for k in range(0, len(order), SANITY_PART)]
    bar = st.progress(0.0, text=f"Randomising the model layer by layer on {count} images...")
    done = []
    for k, part in enumerate(parts):
        done.append(_cascade_part(path, mtime, part, class_choice, methods, xi))
        bar.progress((k + 1) / len(parts), text=f"{min((k + 1) * SANITY_PART, count)} of "
                                                f"{count} images")
    bar.empty()
    return join_cascades(done)


def sanity_statistics(cascade: dict, methods: tuple[str, ...]) -> None:
    """Per method: the verdict in words, then each step's mean ± sd (figure and table)."""
    steps, start = cascade["steps"], cascade["judged_from"]
    rho = {METHODS[m]: summarise_steps(cascade["rho"][m]) for m in methods}
    said = {name: verdict(summary, steps, start) for name, summary in rho.items()}
    st.markdown("\n".join(f"- **{name}** :{VERDICT_COLOURS[v.outcome]}[**{v.outcome}**]: "
                          f"{v.reason}." for name, v in said.items()))
    st.caption(f"Criterion (this project's reading of Adebayo et al. 2018, who give no "
               f"threshold): {CRITERION}")
    st.plotly_chart(cascade_figure(steps, rho, start, PASS_BELOW), key="cm_sanity_curve",
                    config={"displayModeBar": False})
    images = len(cascade["classes"])
    st.markdown(markdown_table([{"rank correlation": name, **{label: str(s) for label, s in
                                                             zip(steps, summary, strict=True)}}
                                for name, summary in rho.items()]))
    st.caption(f"Mean ± sd over {images} test images (a fixed random sample) of the Spearman "
               "rank correlation of each map with the trained model's (1: the same ranking of "
               "pixels; near 0: unrelated); error bars: the "
               f"{100 * CONFIDENCE:.0f} % interval of the mean. Maps of a randomised model that "
               "keep the trained ranking show the input more than the model. A constant map "
               "(nothing to rank) is left out of its step.")
    with st.expander("SSIM, the paper's second measure"):
        st.markdown(markdown_table([{"SSIM": METHODS[m], **{
            label: str(s) for label, s in zip(steps, summarise_steps(cascade["ssim"][m]),
                                              strict=True)}} for m in methods]))
        st.caption("Structural similarity of each map with the trained one (7x7 window, maps "
                   "in [0, 1]): mean ± sd over the same images. Shown, not judged.")


def sanity_check(path: str, mtime: int, data, result: dict, shown: list[str], xi: float,
                 class_choice: str) -> None:
    """Adebayo et al.'s cascade: the layers re-initialised from the top, over a sample of test
    images (the statistics and the verdicts), then one of the images shown, step by step."""
    methods = tuple(m for m in shown if m in ONE_PASS)
    if not methods:
        st.info("The sanity check runs the one-pass methods (Loss-Attention, Grad-CAM, "
                "Grad-CAM++); pick one of them.")
        return
    sizes = [n for n in SANITY_SIZES if n <= len(data)] or [len(data)]
    count = st.select_slider("Test images for the sanity check", sizes,
                             **keep("cm_sanity_n", sizes[min(1, len(sizes) - 1)], sizes))
    sanity_statistics(sample_cascade(path, mtime, len(data), count, class_choice, methods, xi),
                      methods)
    st.markdown("**One image, step by step**")
    index = st.selectbox("Image", result["indices"], format_func=lambda i: f"#{i}",
                         key="cm_sanity_image")
    cascade = _cascade(path, mtime, int(index), class_choice, methods, xi)
    image = to_hwc(data.images[int(index)])
    klass = cascade["classes"][0]
    boxes = ([tuple(b[1:].tolist()) for b in data.boxes(int(index)) if int(b[0]) == klass]
             if data.has_boxes else [])
    steps = cascade["steps"]
    maps = {label: np.stack([cascade["maps"][m][s, 0] for m in methods])
            for s, label in enumerate(steps)}
    st.plotly_chart(map_grid_figure([image] * len(methods), maps,
                                    [METHODS[m] for m in methods], [boxes] * len(methods),
                                    cell=170), key="cm_sanity_maps",
                    config={"displayModeBar": False})
    st.caption("This image's rank correlations: " + "; ".join(
        f"{METHODS[m]} " + " → ".join(f"{v:.2f}" for v in cascade["rho"][m][:, 0])
        for m in methods) + f". Class explained: {data.classes[klass]}, fixed by the trained "
        "model. One image tells little: judge by the statistics above.")


def faithfulness_rows(reports: dict[str, dict], references: dict) -> list[dict]:
    """A row per method, then per reference map (named "ref: ..."), a column per metric."""
    rows = [{"map": METHODS[m], **{COLUMNS.get(k, k): round(v, 4) for k, v in
                                   r["methods"][m].items()}} for m, r in reports.items()]
    rows += [{"map": REFERENCES[name], **{COLUMNS.get(k, k): round(v, 4) for k, v in
                                          values.items()}}
             for name, values in references["references"].items()]
    return rows


def differences_section(reports: dict[str, dict]) -> None:
    """The methods shown (not the references) against Loss-Attention (else the first shown):
    each difference with its paired-bootstrap interval, and in words that follow it."""
    per_image = {m: r["per_image"][m] for m, r in reports.items() if m in r.get("per_image", {})}
    if len(per_image) < 2:  # one method, or rows measured before per-image values were kept
        return
    base = "loss_attention" if "loss_attention" in per_image else next(iter(per_image))
    metrics = [(m.key, m.label, m.better) for m in metrics_of("faithfulness")]
    rows = method_differences(per_image, METHODS, metrics, base)
    if not rows:
        return
    # A Markdown table, not a dataframe: four narrow columns wrap inside 1366 px, and the
    # faithfulness table stays the page's last dataframe.
    table = ["| metric | pair | difference | 95 % interval |", "|---|---|---|---|",
             *(f"| {r['metric']} | {r['pair']} | {r['difference']} | {r['95 % interval']} |"
               for r in rows)]
    st.markdown(f"**Differences from {METHODS[base]}**\n\n" + "\n".join(table))
    sentences = {}
    for r in rows:
        sentences.setdefault(r["metric"], []).append(r["sentence"])
    st.markdown("\n".join(f"- {metric}: " + " ".join(t[0].upper() + t[1:] for t in texts)
                          for metric, texts in sentences.items()))
    st.caption(f"Paired bootstrap over the {rows[0]['n']} images ({BOOTSTRAP_REPS:,} resamples, "
               f"seed {BOOTSTRAP_SEED}): the same images under each map, resampled with "
               "replacement; 95 % percentile interval. A direction is claimed only where the "
               "interval excludes 0.")


def faithfulness_table(path: str, mtime: int, shown: list[str], xi: float,
                       class_choice: str) -> None:
    """Measured on demand for the chosen class, ξ and mask; one cached row per method (and one
    entry for the reference maps), so a method added later (Score-CAM) costs only its row."""
    c1, c2 = st.columns([2, 1])
    n = c1.select_slider("Images to measure on", SIZES, **keep("cm_n", 32, SIZES))
    masks = list(MASKS)
    mask = c2.selectbox("Mask: left-out pixels become", masks,
                        **keep("cm_mask", DEFAULT_MASK, masks),
                        help="; ".join(f"{k}: {v}" for k, v in MASKS.items()) +
                             ". Deletion uses it too; insertion always starts from the "
                             "blurred copy.")
    if st.button("Measure", key="cm_measure", type="primary"):
        st.session_state["cm_measured"] = (path, n)
    if st.session_state.get("cm_measured") != (path, n):
        return
    reports = {}
    for method in shown:
        with st.spinner(f"Measuring {METHODS[method]} on {n} images..."):
            reports[method] = _faithfulness(path, mtime, n, method, xi, class_choice, mask)
    with st.spinner(f"Measuring the reference maps on {n} images..."):
        refs = _faithfulness(path, mtime, n, None, xi, class_choice, mask)
    # A row per map, a column per metric (short headings): four methods and four references
    # fit at 1366 px this way; a column per map did not.
    st.container(key="cm_faithfulness").dataframe(faithfulness_rows(reports, refs),
                                                  hide_index=True)
    report = refs
    st.caption(f"{report['images']} test images (a fixed random sample), class explained: "
               f"{report['class']}, ξ = {xi:.2f}, mask: {mask} ({MASKS[mask]}). Rows "
               "\"ref: ...\" are reference maps, not methods: they know nothing of the model "
               f"(uniform: every pixel 1; random: uniform noise, {RANDOM_DRAWS} seeded draws "
               "averaged; centre: a Gaussian at the centre, σ = side/4; intensity: the image's "
               "grey level). A method is worth its salt where it beats them."
               + (f" Skipped: {report['skipped']}." if "skipped" in report else ""))
    differences_section(reports)
    labels = {**METHODS, **REFERENCES}
    st.plotly_chart(deletion_insertion_figure(
        {**{m: r["curves"][m] for m, r in reports.items()}, **refs["curves"]}, labels),
        key="cm_curves")


ensure_router()
st.title("Compare maps")
with guard("Compare maps"):
    path = require_model_path()
    loaded = loaded_model(path)
    mtime = Path(path).stat().st_mtime_ns
    data = test_set(loaded.data_config)
    has_patches = loaded.model.head.has_patches
    methods = [m for m in METHODS if has_patches or m != "loss_attention"]
    # The methods' chips get three quarters of the row: four of them fit at 1366 px.
    c1, c2 = st.columns([3, 1])
    chosen = c1.multiselect("Methods", methods, format_func=METHODS.get,
                            **keep("cm_methods", methods, methods))
    choices = ["true", "predicted", *data.classes]
    class_choice = c2.selectbox("Explain class", choices, **keep("cm_class", "true", choices))
    c1, c2, c3 = st.columns([1, 1, 2])
    start = int(c1.number_input("First test image", 0, len(data) - 1, step=1,
                                **keep("cm_start", 0, low=0, high=len(data) - 1)))
    count = int(c2.number_input("Images", 1, 8, step=1, **keep("cm_count", 4, low=1, high=8)))
    xi = float(loaded.model.config.xi)
    if loaded.model.xi_dependent:
        xi = c3.slider("ξ (the threshold of the model explained; no retraining)", 0.0, 1.0,
                       step=0.05, **keep("cm_xi", round(xi, 2)),
                       help="Every map, prediction and score below is of the model at this ξ")
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
    st.caption("Every map is scaled to [0, 1] and drawn on the one colour scale; red: the true "
               "box of the explained class. Loss-Attention's map is its patch weights (one per "
               "patch, painted on the patch's pixel box, overlaps averaged): it is the same "
               "whichever class is explained. The CAMs are computed for the chosen class on "
               "the feature cells the head reads (the last row and column of this backbone's "
               "map fall outside every patch and cannot change the prediction) and upsampled.")
    draw_maps(loaded, data, result, shown, xi)
    if st.toggle("Sanity check: randomise the weights, top layer first (Adebayo et al. 2018)",
                 **keep("cm_sanity", False)):
        sanity_check(path, mtime, data, result, shown, xi, class_choice)

    st.subheader("Faithfulness")
    st.caption(
        "Average Drop / Increase in Confidence: map · image + (1 − map) · the mask's fill "
        "(black: the image multiplied by the map, unexplained pixels go black), score of the "
        "explained class before and after (Grad-CAM++'s relative definitions). Deletion: the "
        "most important pixels set to the mask's fill first; insertion: "
        "pixels put back into a blurred copy (σ = side/8); AUC of the score over 16 steps. "
        "Pointing game: the map's maximum within 15 px of a true box; energy: the share of "
        "the map inside the true boxes. The class is the one chosen above.")
    faithfulness_table(path, mtime, shown, xi, class_choice)
