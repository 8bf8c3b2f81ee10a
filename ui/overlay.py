"""Images for people: weight scalings, the patch overlay, explanation maps, PNG/CSV bytes.

Streamlit-free (numpy + PIL + matplotlib colormaps), so every builder is unit-tested directly.
Attention weights are skewed (a few patches hold most of the mass), so a raw colour scale looks
empty; the scalings spread them out for the eye, and the legend says which one is shown.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from engine.fsutil import csv_text

SCALINGS = ("raw", "min-max", "rank", "log")
COLORMAP = "viridis"  # the one colour scale of every weight picture and heat map in the app
BOX_TRUE = (255, 64, 64)
BOX_SELECTED = (64, 200, 255)
BOX_FOCUS = (255, 255, 255)


def scale_weights(weights: np.ndarray, mode: str) -> np.ndarray:
    """Weights (M,) to [0, 1] for colouring.

    ``raw``: as they are (they already lie in [0, 1] and sum to 1). ``min-max``: (w - min) /
    (max - min). ``rank``: the patch's rank among the patches / (M - 1), ties sharing a rank.
    ``log``: log10(w) mapped from [log10(min positive w), 0 at the max] to [0, 1]; zero weights
    stay 0."""
    w = np.asarray(weights, dtype=np.float64)
    if mode not in SCALINGS:
        raise ValueError(f"scaling must be one of {list(SCALINGS)}; got {mode!r}")
    if w.size == 0:
        return w
    if mode == "raw":
        return np.clip(w, 0.0, 1.0)
    if mode == "min-max":
        span = w.max() - w.min()
        return (w - w.min()) / span if span > 0 else np.zeros_like(w)
    if mode == "rank":
        order = np.unique(w, return_inverse=True)[1].astype(np.float64)
        top = order.max()
        return order / top if top > 0 else np.zeros_like(w)
    positive = w > 0
    if not positive.any():
        return np.zeros_like(w)
    logs = np.log10(np.where(positive, w, 1.0))
    low, high = logs[positive].min(), logs[positive].max()
    out = np.where(positive, (logs - low) / (high - low) if high > low else 1.0, 0.0)
    # A positive weight must stay visibly above a zero one even when it is the smallest.
    return np.where(positive, 0.05 + 0.95 * out, 0.0)


def colorize(values: np.ndarray) -> np.ndarray:
    """[0, 1] values (any shape) -> uint8 RGB with the app's colormap."""
    from matplotlib import colormaps

    rgba = np.asarray(colormaps[COLORMAP](np.clip(np.asarray(values, dtype=np.float64), 0, 1)))
    return (rgba[..., :3] * 255).astype(np.uint8)


def cell_edges(grid_boxes: np.ndarray, rows: int, cols: int, size: tuple[int, int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Pixel edges (cols + 1,), (rows + 1,) of the cells that tile the image around the patch
    centres: patch boxes overlap, so each patch is drawn on the cell nearest its centre."""
    boxes = np.asarray(grid_boxes, dtype=np.float64).reshape(rows, cols, 4)
    cx = (boxes[0, :, 0] + boxes[0, :, 2]) / 2
    cy = (boxes[:, 0, 1] + boxes[:, 0, 3]) / 2
    h, w = size
    xs = np.concatenate([[0], (cx[1:] + cx[:-1]) / 2, [w]])
    ys = np.concatenate([[0], (cy[1:] + cy[:-1]) / 2, [h]])
    return xs, ys


def patch_overlay(image: np.ndarray, grid_boxes: np.ndarray, rows: int, cols: int,
                  values: np.ndarray, *, alpha: float = 0.55, scale: int = 10,
                  true_boxes: list[tuple[float, ...]] = (),
                  selection_box: tuple[int, ...] | None = None,
                  focus_patch: int | None = None, grid_lines: bool = True) -> Image.Image:
    """The image (H, W, 3 uint8) enlarged ``scale`` times, each patch's cell tinted by its
    value in [0, 1]; ground-truth boxes red, the selected patches' box blue, and the full pixel
    box of ``focus_patch`` white."""
    h, w = image.shape[:2]
    xs, ys = cell_edges(grid_boxes, rows, cols, (h, w))
    col_of = np.searchsorted(xs[1:-1], np.arange(w) + 0.5)
    row_of = np.searchsorted(ys[1:-1], np.arange(h) + 0.5)
    cell_values = np.asarray(values, dtype=np.float64).reshape(rows, cols)[row_of][:, col_of]
    tint = colorize(cell_values).astype(np.float64)
    mixed = ((1 - alpha) * image.astype(np.float64) + alpha * tint).round().astype(np.uint8)
    big = Image.fromarray(mixed).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    if grid_lines:
        for x in xs[1:-1]:
            draw.line([(x * scale, 0), (x * scale, h * scale)], fill=(255, 255, 255), width=1)
        for y in ys[1:-1]:
            draw.line([(0, y * scale), (w * scale, y * scale)], fill=(255, 255, 255), width=1)
    width = max(2, scale // 4)
    for box in true_boxes:
        draw.rectangle(_scaled(box, scale), outline=BOX_TRUE, width=width)
    if selection_box is not None:
        draw.rectangle(_scaled(selection_box, scale), outline=BOX_SELECTED, width=width)
    if focus_patch is not None:
        draw.rectangle(_scaled(np.asarray(grid_boxes)[focus_patch], scale), outline=BOX_FOCUS,
                       width=width)
    return big


def _scaled(box, scale: int) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1]


def map_overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, scale: int = 6
                ) -> Image.Image:
    """An explanation map (H, W in [0, 1]) blended over the image, enlarged."""
    mixed = (1 - alpha) * image.astype(np.float64) + alpha * colorize(heat).astype(np.float64)
    h, w = image.shape[:2]
    return Image.fromarray(mixed.round().astype(np.uint8)).resize(
        (w * scale, h * scale), Image.Resampling.NEAREST)


def enlarge(image: np.ndarray, scale: int = 6) -> Image.Image:
    h, w = image.shape[:2]
    return Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.NEAREST)


def gallery_strip(images: list[np.ndarray], current: int, scale: int = 2, gap: int = 4
                  ) -> Image.Image:
    """Thumbnails (H, W, 3) side by side, enlarged, the ``current`` one framed in white."""
    h, w = images[0].shape[:2]
    th, tw = h * scale, w * scale
    strip = np.full((th + 2 * gap, len(images) * (tw + gap) + gap, 3), 40, np.uint8)
    for i, image in enumerate(images):
        x = gap + i * (tw + gap)
        if i == current:
            strip[:, x - gap // 2:x + tw + gap // 2] = 255
        strip[gap:gap + th, x:x + tw] = np.repeat(np.repeat(image, scale, 0), scale, 1)
    return Image.fromarray(strip)


def to_hwc(image_chw) -> np.ndarray:
    """uint8 (C, H, W) tensor or array -> (H, W, 3) array (greyscale repeated)."""
    array = np.asarray(image_chw)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array.astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def csv_bytes(rows: list[dict]) -> bytes:
    """Rows as UTF-8 CSV, a column for every key any row has (``engine.fsutil.csv_text``)."""
    return csv_text(rows).encode() if rows else b""
