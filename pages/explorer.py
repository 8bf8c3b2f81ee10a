"""Patch Explorer: which patches made the prediction, at any ξ, for any class.

The backbone runs once over the test images (cached); the ξ slider re-decodes the cached patch
logits inside a fragment, so only the picture and its numbers redraw.
"""

import hashlib
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from engine.explore import (
    OUTCOMES,
    decode,
    filter_indices,
    image_story,
    patch_rows,
    single_image_cache,
    true_boxes,
)
from engine.inputs import image_from_bytes
from engine.metrics import box_iou
from ui.figures import patch_bars
from ui.overlay import (
    SCALINGS,
    csv_bytes,
    gallery_strip,
    patch_overlay,
    png_bytes,
    scale_weights,
    to_hwc,
)
from ui.st_state import (
    collected_test_set,
    guard,
    keep,
    loaded_model,
    require_model_path,
    single_threaded,
)

GALLERY = 12


def class_options(classes: list[str]) -> list[str]:
    return ["any", *classes]


@st.cache_data(max_entries=64, show_spinner=False)
def gallery_png(model_path: str, shown: tuple[int, ...], framed: int, _data) -> bytes:
    """The strip of thumbnails, encoded once per (model, images shown, framed one): moving ξ
    re-draws the page but rarely changes the strip. ``_data`` is not hashed; the test set is
    fixed by the model path."""
    return png_bytes(gallery_strip([to_hwc(_data.images[i]) for i in shown], framed))


def pick_test_image(out, data, model_path: str) -> int | None:
    """Filters and a gallery; returns the index (in ``data``) of the image to show."""
    c1, c2, c3 = st.columns(3)
    names = class_options(data.classes)
    outcome = c1.selectbox("Show", OUTCOMES, **keep("ex_outcome", "all", OUTCOMES))
    true_name = c2.selectbox("True class", names, **keep("ex_true", "any", names))
    pred_name = c3.selectbox("Predicted class", names, **keep("ex_pred", "any", names))
    indices = filter_indices(
        out.logits, data.targets, data.multilabel, outcome=outcome,
        true_class=None if true_name == "any" else data.classes.index(true_name),
        predicted_class=None if pred_name == "any" else data.classes.index(pred_name))
    if len(indices) == 0:
        st.info("No test image passes these filters at this ξ.")
        return None
    position = st.number_input(f"Image ({len(indices)} match)", min_value=0,
                               max_value=len(indices) - 1, step=1,
                               **keep("ex_pos", 0, low=0, high=len(indices) - 1))
    position = min(int(position), len(indices) - 1)
    start = (position // GALLERY) * GALLERY
    shown = indices[start:start + GALLERY].tolist()
    # One strip image rather than twelve: one media file per rerun keeps the slider quick.
    st.image(gallery_png(model_path, tuple(shown), position - start, data),
             caption=f"images #{start}-#{start + len(shown) - 1} of the filtered list; "
             f"the framed one (#{position}) is shown below")
    return int(indices[position])


def show_story(model, out, index: int, classes: list[str], multilabel: bool,
               image: np.ndarray, truth: str, boxes: list, name: str, xi: float) -> None:
    """The large overlay, the prediction, the per-patch logits and the downloads."""
    c1, c2, c3 = st.columns(3)
    scaling = c1.radio("Colour scaling", SCALINGS, horizontal=True,
                       **keep("ex_scaling", "min-max", SCALINGS))
    choices = ["predicted", *classes]
    logits_of = c2.selectbox("Patch logits for class", choices,
                             **keep("ex_class", "predicted", choices))
    most = max(2, min(20, out.grid.num_patches))
    top_k = c3.slider("Top-k patches", 1, most, **keep("ex_topk", min(5, most), low=1, high=most))
    predicted = int(out.logits[index].argmax())
    klass = predicted if logits_of == "predicted" else classes.index(logits_of)
    story = image_story(model, out, index, klass, multilabel)
    top = story.top_patches(top_k)
    focus_choices = ["none", *[f"patch {int(m)}" for m in top]]
    focus = st.selectbox("Outline a patch's full pixel box", focus_choices,
                         **keep("ex_focus", "none", focus_choices))
    focus_patch = None if focus == "none" else int(focus.split()[1])
    values = scale_weights(story.weights.numpy(), scaling)
    picture = patch_overlay(image, story.grid.boxes.numpy(), story.grid.rows, story.grid.cols,
                            values, true_boxes=[b for _, b in boxes],
                            selection_box=story.selection_box, focus_patch=focus_patch)
    picture_png = png_bytes(picture)  # shown and offered for download: encoded once
    left, right = st.columns([3, 2])
    with left:
        st.image(picture_png, caption=f"{name}: weights ({scaling}) over "
                 f"{story.grid.rows}x{story.grid.cols} patches; red: true box, blue: box of the "
                 "selected patches", width=420)
        d1, d2 = st.columns(2)
        d1.download_button("Overlay PNG", picture_png, f"{name}-xi{xi:.2f}.png",
                           "image/png", key="ex_dl_png")
        d2.download_button("Weights CSV", csv_bytes(patch_rows(story, classes, klass)),
                           f"{name}-xi{xi:.2f}-weights.csv", "text/csv", key="ex_dl_csv")
    with right:
        probability = float(story.probabilities[predicted])
        st.metric("Prediction", classes[predicted], f"{probability:.1%} confidence",
                  delta_color="off")
        st.caption(f"True: {truth}")
        st.write(f"**{int(story.selected.sum())}** of {story.grid.num_patches} patches selected "
                 f"at ξ = {xi:.2f}")
        order = story.probabilities.argsort(descending=True)[:3].tolist()
        st.dataframe({"class": [classes[k] for k in order],
                      "probability": [round(float(story.probabilities[k]), 4) for k in order]},
                     hide_index=True)
        st.dataframe({"patch": [int(m) for m in top],
                      "weight": [round(float(story.weights[m]), 4) for m in top],
                      f"logit ({classes[klass]})": [round(float(story.class_logits[m]), 3)
                                                    for m in top],
                      "patch says": [classes[int(story.patch_predictions[m])] for m in top]},
                     hide_index=True)
        if story.selection_box and boxes:
            iou = box_iou(torch.tensor([story.selection_box], dtype=torch.float64),
                          torch.tensor([b for _, b in boxes], dtype=torch.float64)).max()
            st.write(f"Selected-patch box vs true box: IoU **{float(iou):.2f}**")
    st.plotly_chart(patch_bars(story.class_logits.tolist(), story.weights.tolist(),
                               story.selected.tolist(), f"logit for {classes[klass]}"),
                    key="ex_bars")


@st.fragment
def explore_test_set(model, data, collected, model_path: str) -> None:
    xi = st.slider("ξ (threshold; no retraining)", 0.0, 1.0, step=0.01,
                   **keep("xi", float(model.config.xi)))
    with single_threaded():
        out = decode(model, collected, xi)
    index = pick_test_image(out, data, model_path)
    if index is None:
        return
    target = data.targets[index]
    truth = (", ".join(data.classes[k] for k in target.nonzero().flatten().tolist())
             if data.multilabel else data.classes[int(target)])
    boxes = true_boxes(data, index)
    show_story(model, out, index, data.classes, data.multilabel,
               to_hwc(data.images[index]), truth, boxes, f"test{index}", xi)


@st.cache_resource(max_entries=8, show_spinner=False)
def upload_cache(model_path: str, mtime_ns: int, digest: str, name: str, policy: str,
                 _payload: bytes, _model, _data):
    """The uploaded image as a model input and its ξ cache: the backbone runs once per
    (checkpoint, upload), and a ξ move only re-decodes. A bad file raises and is not cached.
    The image is prepared exactly as the model's training images were (``policy``)."""
    del model_path, mtime_ns, digest  # the cache key
    image = image_from_bytes(_payload, _data.input_size, name, policy)
    return image, single_image_cache(_model, image, _data)


@st.fragment
def explore_upload(model, data, upload, model_path: str, policy: str) -> None:
    xi = st.slider("ξ (threshold; no retraining)", 0.0, 1.0, step=0.01,
                   **keep("xi", float(model.config.xi)))
    with guard("The uploaded image", stop=False):
        payload = upload.getvalue()
        image, collected = upload_cache(model_path, Path(model_path).stat().st_mtime_ns,
                                        hashlib.sha256(payload).hexdigest(), upload.name,
                                        policy, payload, model, data)
        out = decode(model, collected, xi)
        show_story(model, out, 0, data.classes, data.multilabel, to_hwc(image),
                   "unknown (your image)", [], "upload", xi)


st.title("Patch Explorer")
with guard("The Patch Explorer"):
    path = require_model_path()
    loaded = loaded_model(path)
    model = loaded.model
    if not model.head.has_patches:
        st.warning(f"The model's head ({model.config.head!r}) has no patches to explore; "
                   "pick a patch model in the sidebar.")
        st.stop()
    data, collected = collected_test_set(loaded)
    st.caption(f"{model.config.backbone} / {model.config.head} on {data.name} "
               f"({len(data)} test images); trained at ξ = {model.config.xi}")
    sources = ["test set", "upload your own"]
    source = st.radio("Images", sources, horizontal=True, **keep("ex_source", sources[0], sources))
    if source == "test set":
        explore_test_set(model, data, collected, path)
    else:
        upload = st.file_uploader("An image (any format, size and mode)", key="ex_upload")
        policy = loaded.data_config.resize
        if upload is not None:
            explore_upload(model, data, upload, path, policy)
        else:
            how = ("squashed (both sides scaled)" if policy == "squash"
                   else "centre-cropped (shorter side scaled)")
            st.caption(f"It is turned upright (EXIF), {how} to {data.input_size[0]}x"
                       f"{data.input_size[1]}, exactly as the model's training images were.")
