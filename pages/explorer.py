"""Patch Explorer: which patches made the prediction, at any ξ, for any class.

The backbone runs once over the test images (cached); the ξ slider re-decodes the cached patch
logits inside a fragment, so only the picture and its numbers redraw. The map and the sorted
scores are SVG markup (ui.explorer_figures); the PNG download is the same map drawn on the server.
"""

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
import torch

from engine.checkpoint import NOTE_KEY
from engine.explore import (
    OUTCOMES,
    decode,
    energy_rank,
    filter_indices,
    image_story,
    patch_rows,
    prediction_breakdown,
    single_image_cache,
    story_picture,
    threshold_view,
    true_boxes,
)
from engine.inputs import image_from_bytes
from engine.metrics import box_iou
from engine.pictures import enlarge, png_bytes, to_hwc
from engine.samples import SAMPLES, sample_png
from ui.explorer_figures import (
    breakdown_latex,
    breakdown_rows,
    patch_map_svg,
    sorted_scores_svg,
    svg_width,
)
from ui.figures import gamma_effects, patch_bars
from ui.overlay import csv_bytes, gallery_strip
from ui.st_gamma import NONE, GammaSource, gamma_sources, source_of
from ui.st_guards import guard, single_threaded
from ui.st_links import ensure_router, link_value, take_link, write_link
from ui.st_models import (
    collected_test_set,
    loaded_model,
    model_sources,
    patch_loss_partner,
    require_model_path,
)
from ui.st_session import MODEL_KEY, keep, remember, remembered
from ui.tables import markdown_table, md_text

GALLERY = 12
GAMMA_OVER = "ex_gamma_over"  # the family the γmax slider slides over, as last chosen
SHOWN_INDEX = "_ex_shown_index"  # the test image on screen (kept by a γmax move)
GAMMA_MOVED = "_ex_gamma_moved"  # a γmax move asks the next run to draw the whole page
LOW_CONFIDENCE = 0.5
UNFAMILIAR = 0.99  # warn above this energy rank among the test images
SAMPLE_DATA = ("digits", "digits_multilabel")  # the data sets the drawn samples are for


@dataclass
class Shown:
    """The image on screen: where it is in the decoded outputs and in the test set (None for an
    upload), its pixels (uint8, 3 x H x W), its label and boxes, its name in file names."""

    index: int
    test_index: int | None
    pixels: torch.Tensor
    truth: str
    boxes: list
    name: str
    energy_rank: float | None = None  # an upload's rank among the test images (warning)

    @property
    def image(self):
        return to_hwc(self.pixels)


def class_options(classes: list[str]) -> list[str]:
    return ["any", *classes]


@st.cache_data(max_entries=64, show_spinner=False)
def gallery_png(model_path: str, shown: tuple[int, ...], framed: int, _data) -> bytes:
    """The strip of thumbnails, encoded once per (model, images shown, framed one): moving ξ
    re-draws the page but rarely changes the strip. ``_data`` is not hashed; the test set is
    fixed by the model path."""
    return png_bytes(gallery_strip([to_hwc(_data.images[i]) for i in shown], framed))


def adopt_link_view(params: dict[str, str], size: int) -> None:
    """A link's image (a test-set index) and ξ become the page's state: the filters are reset,
    so that the image is the one the link meant. A bad value is named and ignored."""
    if "image" in params:
        try:
            index = int(params["image"])
            if not 0 <= index < size:
                raise ValueError
        except ValueError:
            st.warning(f"The link's image {params['image']!r} is not a test image number "
                       f"(0 to {size - 1}); showing the first.")
        else:
            for key, value in [("ex_source", "test set"), ("ex_outcome", "all"),
                               ("ex_true", "any"), ("ex_pred", "any"), ("ex_pos", index)]:
                remember(key, value)
    if "xi" in params:
        try:
            xi = float(params["xi"])
            if not 0.0 <= xi <= 1.0:
                raise ValueError
        except ValueError:
            st.warning(f"The link's ξ {params['xi']!r} is not a number in [0, 1]; ignored.")
        else:
            remember("xi", round(xi, 2))


@dataclass
class Picked:
    """The filters and the position in the filtered list, chosen outside the ξ fragment."""

    outcome: str
    true_class: int | None
    predicted_class: int | None
    position: int


def matching(out, data, picked: Picked):
    """The test images that pass the filters at the ξ ``out`` was decoded at."""
    return filter_indices(out.logits, data.targets, data.multilabel, outcome=picked.outcome,
                          true_class=picked.true_class, predicted_class=picked.predicted_class)


def pick_filters(loaded, data, collected) -> Picked:
    """Which test images, and which of them: drawn outside the ξ fragment, so that a ξ move
    does not redraw them (the browser redraws the page once per element it receives). The
    count in the position's label is at the ξ of the last full run; the gallery's caption
    gives it at the current ξ. Two by two: they sit in a fold a third of the page wide."""
    c1, c2 = st.columns(2)
    c3, c4 = st.columns(2)
    names = class_options(data.classes)
    outcome = c1.selectbox("Show", OUTCOMES, **keep("ex_outcome", "all", OUTCOMES))
    true_name = c2.selectbox("True class", names, **keep("ex_true", "any", names))
    pred_name = c3.selectbox("Predicted class", names, **keep("ex_pred", "any", names))
    true_class = None if true_name == "any" else data.classes.index(true_name)
    predicted_class = None if pred_name == "any" else data.classes.index(pred_name)
    with single_threaded():
        out = decode(loaded.model, collected,
                     st.session_state.get("xi", float(loaded.model.config.xi)))
    indices = filter_indices(out.logits, data.targets, data.multilabel, outcome=outcome,
                             true_class=true_class, predicted_class=predicted_class)
    count = len(indices)
    keep_image(indices)
    position = c4.number_input(f"Image ({count} match)", min_value=0,
                               max_value=max(count - 1, 0), step=1,
                               **keep("ex_pos", 0, low=0, high=max(count - 1, 0)))
    return Picked(outcome, true_class, predicted_class, int(position))


KEEP_IMAGE = "_ex_keep_image"  # the test image a γmax move must keep on screen


def keep_image(indices) -> None:
    """After a γmax move the new model filters the test images its own way: the image on
    screen stays, at its place among the images that pass the filters, or, where it no longer
    passes them, with the filters reset (said in a toast)."""
    index = st.session_state.pop(KEEP_IMAGE, None)
    if index is None:
        return
    found = (indices == index).nonzero().flatten().tolist()
    if found:
        remember("ex_pos", found[0])
        return
    for key, value in [("ex_outcome", "all"), ("ex_true", "any"), ("ex_pred", "any"),
                       ("ex_pos", index)]:
        remember(key, value)
    st.toast("The same image under the new γmax no longer passes the filters: they were "
             "reset to show it.")
    st.rerun()


def show_gallery(slot, indices, position: int, data, model_path: str, xi: float) -> None:
    start = (position // GALLERY) * GALLERY
    shown = indices[start:start + GALLERY].tolist()
    # One strip image rather than twelve: one media file per rerun keeps the slider quick.
    slot.image(gallery_png(model_path, tuple(shown), position - start, data),
               caption=f"images #{start}-#{start + len(shown) - 1} of the {len(indices)} that "
               f"pass the filters at ξ = {xi:.2f}; the framed one (#{position}) is shown above "
               "(another: Images, at the top)")


def xi_slider(model) -> float:
    return st.slider("ξ (threshold; no retraining)", 0.0, 1.0, step=0.01,
                     help="Patches whose share of the logit norms is below θ are removed and "
                     "the rest are renormalised. ξ = 0 keeps every patch; ξ = 1 keeps the "
                     "above-average ones.", **keep("xi", float(model.config.xi)))


def view_controls(classes: list[str], num_patches: int) -> dict:
    """The view options, outside the ξ fragment (in their fold): the class whose patch logits
    are listed and how many patches the breakdown shows."""
    c1, c2 = st.columns(2)
    choices = ["predicted", *classes]
    logits_of = c1.selectbox("Patch logits for class", choices,
                             **keep("ex_class", "predicted", choices))
    most = max(2, min(12, num_patches))
    top_k = c2.slider("Patches in the breakdown", 1, most,
                      **keep("ex_topk", min(5, most), low=1, high=most))
    return {"logits_of": logits_of, "top_k": top_k}


def pair_toggle(partner: str | None, gamma: float) -> bool:
    """The with / without-patch-loss view, in sight above the map (not in a fold): the
    paper's ablation on one image is what a class is shown first."""
    if partner is None:
        return False
    # The pair has exactly one model without the patch loss: this one, or the partner.
    return st.toggle("Beside: γmax = 0" if gamma else "Beside: with patch loss",
                     **keep("ex_pair", False),
                     help=f"With / without the patch loss: beside this model, {partner}, "
                     "trained the same way but with the other γmax (γmax = 0: no patch "
                     "loss). Same image, same ξ, both maps the same size.")


def gamma_control(current: str, gamma: float) -> GammaSource | None:
    """*γmax slides over* (with the view options): a shipped family, or a sweep's cells that
    differ only in γmax. Choosing one opens its model nearest this γmax.
    Returns the source the γmax slider (:func:`gamma_slider`) moves over, if any."""
    sources = gamma_sources(current)
    names = [NONE, *[s.name for s in sources]]
    # The model explained decides what is slid over, except just after a choice that could
    # not be slid over: it stays chosen, with its reason, until another choice or model.
    name, model = remembered(GAMMA_OVER) or (None, None)
    picked = next((s for s in sources if s.name == name and s.problem), None)
    if model == current and name == NONE:  # "this model only", chosen for this model
        chosen = None
    else:
        chosen = picked if picked and model == current else source_of(sources, current)
    st.session_state[f"w_{GAMMA_OVER}"] = chosen.name if chosen else NONE

    def over_changed() -> None:
        name = st.session_state[f"w_{GAMMA_OVER}"]
        remember(GAMMA_OVER, (name, current))
        new = next((s for s in sources if s.name == name), None)
        if new is not None and new.stops:  # its model nearest this γmax
            open_stop(new.stops[min(new.stops, key=lambda g: abs(g - gamma))])

    st.selectbox("γmax slides over", names, key=f"w_{GAMMA_OVER}", on_change=over_changed,
                 help="γmax shapes training, so each stop of the γmax slider is a model "
                      "trained at that γmax: a shipped family (the live preset's: γmax 0 to 3, "
                      "a plain `python -m engine train`; the 30-epoch pair: 0 and 0.1), or the "
                      "cells of a finished sweep that differ only in γmax.")
    if chosen is not None and chosen.problem:
        st.warning(chosen.problem)
        return None
    return chosen


def open_stop(label: str) -> None:
    """Explain model ``label`` next, on the image now on screen (a γmax move)."""
    remember(MODEL_KEY, label)
    remember(KEEP_IMAGE, remembered(SHOWN_INDEX))
    remember(GAMMA_MOVED, True)


def gamma_slider(family: GammaSource | None, gamma: float) -> None:
    """The γmax slider, under the ξ slider: each stop a model of ``family``. A move opens that
    model, and the whole page is drawn again for it (the sidebar, the filters' counts and the
    link included), not only this fragment."""
    if family is None:
        return
    st.session_state["w_gamma"] = gamma
    st.select_slider("γmax (one trained model a stop)", list(family.stops), key="w_gamma",
                     format_func=lambda g: f"{g:g}",
                     on_change=lambda: open_stop(family.stops[st.session_state["w_gamma"]]),
                     help=f"{family.name}" + (f", {family.note}" if family.note else "")
                     + ". A move opens the model trained at that γmax on the same image at "
                     "the same ξ: ξ re-thresholds a trained model, γmax needs training.")


def rerun_after_gamma_move() -> None:
    """A γmax move (a widget of the ξ fragment) swapped the model: draw the whole page."""
    if st.session_state.pop(GAMMA_MOVED, False):
        st.rerun(scope="app")


MAP_HEIGHT = 430  # the map alone: with the title and the folds above it, within 768 px
PAIR_HEIGHT = 350  # two maps side by side, each in half of the map's column at 1366 px


def show_map(story, shown, key: str, title=None, height=MAP_HEIGHT, colour_bar=True,
             caption: str | None = None) -> None:
    """The patch map (SVG marked ``data-map=key`` for the browser test) as an image: as markup
    it would go through Streamlit's markdown parser on every ξ move (``st.html`` strips SVG)."""
    svg = patch_map_svg(shown.image, story.grid.boxes.numpy(), story.grid.rows, story.grid.cols,
                        story.weights.tolist(), story.selected.tolist(),
                        true_boxes=[b for _, b in shown.boxes],
                        selection_box=story.selection_box, title=title, height=height,
                        colour_bar=colour_bar, name=key)
    # At its own size: stretched to the wide column it would push the map below the screen,
    # and of two maps side by side the narrower SVG would be drawn the smaller.
    st.image(svg, caption=caption, width=svg_width(svg))


def show_facts(story, classes: list[str], shown: Shown, xi: float) -> None:
    """The prediction, its confidence, how many patches survive, the top classes and the box
    IoU, in one markdown element (warnings apart)."""
    truth, boxes = shown.truth, shown.boxes
    probability = float(story.probabilities[story.predicted])
    if probability < LOW_CONFIDENCE:
        st.warning(f"Low confidence ({probability:.0%}): the model is unsure about this image, "
                   "so its patch weights explain a weak decision.")
    if shown.energy_rank is not None and shown.energy_rank >= UNFAMILIAR:
        st.warning(f"Unlike the training data: the model's energy score for this image is "
                   f"higher than for {shown.energy_rank:.1%} of the test images (Liu et al. "
                   "2020). Read its patches as what it grasps at, not as evidence.")
    order = story.probabilities.argsort(descending=True)[:3].tolist()
    paragraphs = [(f"Prediction: **{md_text(classes[story.predicted])}** ({probability:.1%} "
                  f"confidence); true: {md_text(truth)}"),
                  (f"**{int(story.selected.sum())}** of {story.grid.num_patches} patches kept "
                  f"at ξ = {xi:.2f}"),
                  markdown_table([{"class": classes[k],
                                   "probability": f"{float(story.probabilities[k]):.4f}"}
                                  for k in order])]
    if story.selection_box and boxes:
        iou = box_iou(torch.tensor([story.selection_box], dtype=torch.float64),
                      torch.tensor([b for _, b in boxes], dtype=torch.float64)).max()
        paragraphs.append(f"Kept-patch box (blue) vs true box (red): IoU **{float(iou):.2f}**")
    st.markdown("\n\n".join(paragraphs))


def show_partner(partner: str, data, shown: Shown, xi: float) -> None:
    """The γmax = 0 model's map of the same image at the same ξ."""
    loaded = loaded_model(model_sources()[partner])
    model = loaded.model
    if shown.test_index is None:
        collected, index = single_image_cache(model, shown.pixels, data), 0
    else:
        collected, index = collected_test_set(loaded)[1], shown.test_index
    with single_threaded():
        out = decode(model, collected, xi)
    story = image_story(model, out, index, int(out.logits[index].argmax()), data.multilabel)
    title = f"γmax = {gamma_of(loaded):g}: {map_title(story, data.classes)}"
    show_map(story, shown, "ex_map_partner", title=title, height=PAIR_HEIGHT, colour_bar=False)


def map_caption(name: str, paired: bool = False) -> str:
    """What the map's marks mean, the kept-patch box's size included: a patch reads more
    pixels than the cell it is drawn in (cells tile the image around the patch centres, and
    patches overlap), so the box around what the kept patches read reaches past their cells."""
    scale = "√α colour scale: dark small, yellow large" if paired else "fixed √α colour scale"
    return (f"{name}: each patch tinted by its weight α ({scale}), grey where ξ removed it; "
            "red: the true box. Dashed blue: the kept-patch box, around every pixel the kept "
            "patches read. It reaches past their tinted cells: a patch reads more than its "
            "cell (cells tile the image around the patch centres; patches overlap).")


def map_title(story, classes) -> str:
    probability = float(story.probabilities[story.predicted])
    return f"{classes[story.predicted]} ({probability:.0%}), {int(story.selected.sum())} kept"


def gamma_of(loaded) -> float:
    return float(loaded.checkpoint["run_config"].get("loss", {}).get("gamma_max", 0.1))


def show_story(loaded, data, out, collected, shown: Shown, xi: float, controls, main,
               view: dict) -> None:
    """The map beside the ξ slider (with the facts under the slider), or the map and the
    other model's side by side; below, the page's full width: the threshold's cut, Eq. 5 with
    the real numbers, every patch's logit, downloads. The map is drawn first: on a ξ move the
    browser redraws once per element received, and the map is what the user watches."""
    model, classes = loaded.model, data.classes
    predicted = int(out.logits[shown.index].argmax())
    klass = predicted if view["logits_of"] == "predicted" else classes.index(view["logits_of"])
    story = image_story(model, out, shown.index, klass, data.multilabel)
    with main:
        if view["compare"]:
            picture, other = st.columns(2)
            with picture:
                # No colour bar on either: it would make this map the narrower of the two.
                show_map(story, shown, "ex_map", title=f"γmax = {gamma_of(loaded):g} (this "
                         f"model): {map_title(story, classes)}", height=PAIR_HEIGHT,
                         colour_bar=False, caption=map_caption(shown.name, paired=True))
            with other:
                show_partner(view["partner"], data, shown, xi)
        else:
            show_map(story, shown, "ex_map", caption=map_caption(shown.name))
    with controls:
        show_facts(story, classes, shown, xi)
    left, right = st.columns([2, 3], gap="medium")
    with left:
        st.subheader("What ξ cuts", help="The threshold compares each patch's score with θ.")
        cut = threshold_view(model, collected, out, shown.index, xi)
        st.image(sorted_scores_svg(cut.scores.tolist(), story.selected.tolist(), cut.cut,
                                   cut.score_name, cut.cut_name, name="ex_scores"))
    with right:
        show_breakdown(out, shown.index, data.multilabel, classes, view["top_k"],
                       removed=int((story.weights == 0).sum()))
    # Toggles, not expanders: an expander's content is built and sent on every ξ move even
    # when closed (a chart, the PNG and the CSV), and the slider waits on it.
    if shipped_family(loaded.path) and st.toggle(
            "What γmax does: this family over 3 seeds, at this ξ", **keep("ex_gamma_fx", False)):
        gamma_effects_view(xi, gamma_of(loaded))
    if st.toggle("Every patch's logit, and downloads", **keep("ex_extras", False)):
        extras(story, shown, classes, klass, xi)


def shipped_family(path: str) -> bool:
    """Whether ``path`` is a member of the shipped γmax family, which the results describe."""
    from engine.gamma_family import CHECKPOINTS, GAMMAS, checkpoint_name

    here = Path(path).resolve()
    return any(here == (CHECKPOINTS / checkpoint_name(g)).resolve() for g in GAMMAS)


@st.cache_data(show_spinner=False)
def _family_results(mtime_ns: int) -> dict:
    del mtime_ns  # the cache key: a regenerated file is read again
    from engine.gamma_family import load_results

    return load_results()


def gamma_effects_view(xi: float, gamma: float) -> None:
    """Accuracy, patch P / R / F, localization and patches kept against γmax at this ξ, from
    the shipped results file (3 seeds per value on the whole test set; no compute here)."""
    from engine.gamma_family import RESULTS, at_xi, effect_sentences

    with guard("What γmax does", stop=False):
        results = _family_results((RESULTS / "results.csv").stat().st_mtime_ns)
        entries = at_xi(results, xi)
        st.plotly_chart(gamma_effects(entries, gamma), key="ex_gamma_fx_chart")
        st.caption(f"At ξ = {entries[0]['xi']:.2f}, this model's γmax ({gamma:g}) in orange. "
                   f"Markers: the mean of {len(results['seeds'])} seeds (3 models per γmax, "
                   "one recipe); bars: the lowest to the highest seed. A step between two "
                   "γmax values exceeds the seeds' spread when their bars do not overlap; "
                   "with 3 seeds that happens by chance about 1 time in 10 where nothing "
                   "differs, so read one small step with care.")
        st.markdown("\n".join(f"- {line}" for line in effect_sentences(entries)))


def show_breakdown(out, index, multilabel, classes, top_k, removed: int) -> None:
    """Eq. 5 with this image's numbers, written out and as a table; ``removed``: how many
    patches the threshold removed (α = 0), listed apart from the kept ones."""
    breakdown = prediction_breakdown(out, index, multilabel, patches=top_k)
    if not breakdown.exact:
        st.markdown("### How the prediction is built (Eq. 5)")
        st.info("This head's image logit is not a weighted sum of its patch logits (capsule "
                "heads sum capsule channels), so Eq. 5's breakdown does not apply.")
        return
    st.markdown("### How the prediction is built (Eq. 5)\n\nA row is one patch m: its weight "
                "α, its logits O (the shared classifier on that patch alone) and its terms α·O. "
                "Each α·O column sums to z, the image's logit; removed patches have α = 0 and "
                "add nothing.")
    st.latex(breakdown_latex(breakdown, classes, multilabel, removed=removed))
    st.markdown(markdown_table(breakdown_rows(breakdown, classes, multilabel, removed=removed)))


def extras(story, shown: Shown, classes, klass, xi) -> None:
    st.plotly_chart(patch_bars(story.class_logits.tolist(), story.weights.tolist(),
                               story.selected.tolist(), f"logit for {classes[klass]}"),
                    key="ex_bars")
    picture = story_picture(story, shown.image, [b for _, b in shown.boxes])
    name = shown.name
    d1, d2 = st.columns(2)
    d1.download_button("Overlay PNG", png_bytes(picture), f"{name}-xi{xi:.2f}.png",
                       "image/png", key="ex_dl_png")
    d2.download_button("Weights CSV", csv_bytes(patch_rows(story, classes, klass)),
                       f"{name}-xi{xi:.2f}-weights.csv", "text/csv", key="ex_dl_csv")


@st.fragment
def explore_test_set(loaded, data, collected, picked: Picked, view: dict) -> None:
    """What a ξ move redraws: the slider, the map, the facts, the cut, Eq. 5 and the gallery
    (last, though shown under the map: the filtered list changes with ξ)."""
    rerun_after_gamma_move()
    controls, main = st.columns([1, 3.4], gap="medium")
    gallery = st.empty()  # under the map: the map is what a first screen is for
    with controls:
        xi = xi_slider(loaded.model)
        gamma_slider(view["family"], gamma_of(loaded))
    with single_threaded():
        out = decode(loaded.model, collected, xi)
    indices = matching(out, data, picked)
    if len(indices) == 0:
        gallery.info(f"No test image passes these filters at ξ = {xi:.2f}.")
        return
    position = min(picked.position, len(indices) - 1)
    index = int(indices[position])
    target = data.targets[index]
    truth = (", ".join(data.classes[k] for k in target.nonzero().flatten().tolist())
             if data.multilabel else data.classes[int(target)])
    shown = Shown(index, index, data.images[index], truth, true_boxes(data, index),
                  f"test{index}")
    remember(SHOWN_INDEX, index)
    show_story(loaded, data, out, collected, shown, xi, controls, main, view)
    show_gallery(gallery, indices, position, data, loaded.path, xi)
    write_link(model=link_value(remembered(MODEL_KEY)), image=index, xi=f"{xi:.2f}",
               gamma=f"{gamma_of(loaded):g}")


@st.cache_resource(max_entries=8, show_spinner=False)
def upload_cache(model_path: str, mtime_ns: int, digest: str, name: str, policy: str,
                 _payload: bytes, _model, _data):
    """The uploaded image as a model input and its ξ cache: the backbone runs once per
    (checkpoint, upload), and a ξ move only re-decodes. A bad file raises and is not cached.
    The image is prepared exactly as the model's training images were (``policy``)."""
    del model_path, mtime_ns, digest  # the cache key
    image = image_from_bytes(_payload, _data.input_size, name, policy)
    return image, single_image_cache(_model, image, _data)


@st.cache_resource(max_entries=32, show_spinner=False)
def test_logits_at(model_path: str, mtime_ns: int, xi: float, _model, _collected):
    """The test images' image logits at ``xi``, for the unfamiliar-input warning: decoded once
    per (model, ξ), not on every rerun of an upload's view."""
    del model_path, mtime_ns  # the cache key
    with single_threaded():
        return decode(_model, _collected, xi).logits


@st.fragment
def explore_file(loaded, data, test_collected, view: dict, payload: bytes, name: str,
                 truth: str) -> None:
    """An uploaded file or a drawn sample, read exactly as the model's training images were;
    beside the ξ slider, the file as given and the exact model input."""
    rerun_after_gamma_move()
    remember(SHOWN_INDEX, None)  # not a test image: a γmax move keeps this file instead
    controls, main = st.columns([1, 3.4], gap="medium")
    with controls:
        xi = xi_slider(loaded.model)
        gamma_slider(view["family"], gamma_of(loaded))
    with guard("The image", stop=False):
        image, collected = upload_cache(loaded.path, Path(loaded.path).stat().st_mtime_ns,
                                        hashlib.sha256(payload).hexdigest(), name,
                                        loaded.data_config.resize, payload, loaded.model, data)
        with single_threaded():
            out = decode(loaded.model, collected, xi)
        reference = test_logits_at(loaded.path, Path(loaded.path).stat().st_mtime_ns, xi,
                                  loaded.model, test_collected)
        rank = energy_rank(reference, out.logits[0])
        shown = Shown(0, None, image, truth, [], Path(name).stem or "upload",
                      energy_rank=rank)
        show_story(loaded, data, out, collected, shown, xi, controls, main, view)
        with controls:
            show_input_preview(payload, image, loaded.data_config.resize)
    write_link(model=link_value(remembered(MODEL_KEY)), xi=f"{xi:.2f}",
               gamma=f"{gamma_of(loaded):g}")


def show_input_preview(payload: bytes, image, policy: str) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as given:
        size = given.size
    how = "squashed" if policy == "squash" else "centre-cropped"
    c1, c2 = st.columns(2)
    c1.image(payload, caption=f"your file ({size[0]}x{size[1]})", width="stretch")
    c2.image(png_bytes(enlarge(to_hwc(image), 4)), width="stretch",
             caption=f"the model's input ({image.shape[2]}x{image.shape[1]}, {how})")


def pick_file(loaded, data, source: str) -> tuple[bytes, str, str] | None:
    """The bytes, name and truth of the chosen sample or upload; None until there is one."""
    if source == "samples":
        names = list(SAMPLES)
        name = st.selectbox("Sample", names, **keep("ex_sample", names[0], names),
                            help="Drawn here, not from the data set: a typed digit, small, "
                            "rotated, two at once, and no digit at all.")
        return sample_png(name), f"{name}.png", f"{SAMPLES[name].truth} (a drawn sample)"
    upload = st.file_uploader("An image (any format, size and mode)", key="ex_upload")
    if upload is None:
        policy = loaded.data_config.resize
        how = ("squashed (both sides scaled)" if policy == "squash"
               else "centre-cropped (shorter side scaled)")
        st.caption(f"It is turned upright (EXIF), {how} to {data.input_size[0]}x"
                   f"{data.input_size[1]}, exactly as the model's training images were.")
        return None
    return upload.getvalue(), upload.name, "unknown (your image)"


def choices(loaded, data, collected) -> tuple[str, Picked | None, tuple | None, dict]:
    """One row above the map: the images (source, filters, sample or upload) and the view
    options each in a fold, the with / without toggle in sight. Folded, the row is one line,
    so that at 1366x768 the ξ slider and the whole map are on the first screen; their values
    live on (``keep``) while a fold is closed. Returns the source, the filters (test set) or the
    chosen file (bytes, name, truth; None until there is one), and the view options."""
    images, options, pair = st.columns([2.2, 2.2, 1.3])
    picked = chosen = None
    with images.expander("Images: test set, samples, your own; filters"):
        sources = ["test set", *(["samples"] if data.name in SAMPLE_DATA else []),
                   "upload your own"]
        source = st.radio("Images", sources, horizontal=True,
                          **keep("ex_source", sources[0], sources))
        if source == "test set":
            picked = pick_filters(loaded, data, collected)
        else:
            chosen = pick_file(loaded, data, source)
    with options.expander("View options: class, breakdown, γmax"):
        view = view_controls(data.classes, collected.grid.num_patches)
        view["family"] = gamma_control(remembered(MODEL_KEY), gamma_of(loaded))
    view["partner"] = patch_loss_partner(loaded.path)
    with pair:
        view["compare"] = pair_toggle(view["partner"], gamma_of(loaded))
    return source, picked, chosen, view


ensure_router()
st.title("Patch Explorer")
with guard("The Patch Explorer"):
    path = require_model_path()
    loaded = loaded_model(path)
    model = loaded.model
    if loaded.checkpoint.get(NOTE_KEY):  # written before checkpoints carried a checksum
        st.caption(f"Unverified: {loaded.checkpoint[NOTE_KEY]}.")
    if not model.head.has_patches:
        st.warning(f"The model's head ({model.config.head!r}) has no patches to explore; "
                   "pick a patch model in the sidebar.")
        st.stop()
    data, collected = collected_test_set(loaded)
    adopt_link_view(take_link(), len(data))
    # The model by the name the sidebar's picker (and a shipped model's card) gives it.
    st.caption(f"**{md_text(remembered(MODEL_KEY).removeprefix('shipped: '))}**: "
               f"{model.config.backbone} / "
               f"{model.config.head} on {data.name} ({len(data)} test images), trained at "
               f"ξ = {model.config.xi}, γmax = {gamma_of(loaded):g}")
    source, picked, chosen, view = choices(loaded, data, collected)
    if source == "test set":
        explore_test_set(loaded, data, collected, picked, view)
    elif chosen is not None:
        explore_file(loaded, data, collected, view, *chosen)
    else:
        st.info("Choose an image to upload under *Images* above.")
