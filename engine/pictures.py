"""The patch-weight picture as a PNG: the fixed colour scale, greyed removed patches, numbers.

Shared by the app (its PNG download) and ``python -m engine explain``, so a picture from the
command line and one from the Patch Explorer look the same. numpy + PIL + matplotlib only.

The colour scale is fixed, not stretched per image: a patch's colour is √α of its weight α in
[0, 1] (viridis), so the same colour means the same weight in every image and at every ξ, and the
square root keeps both the uniform 1/36 ≈ 0.03 of ξ = 0 and the few large weights of a trained
model apart. Patches that the threshold removed (α = 0) are greyed out instead of coloured.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

COLORMAP = "viridis"  # the one colour scale of every weight picture and heat map in the app
BOX_TRUE = (255, 64, 64)
BOX_SELECTED = (64, 200, 255)
BOX_FOCUS = (255, 255, 255)
REMOVED_GREY = (128, 128, 128)
WEIGHT_TICKS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Weights marked on the colour bar (placed at √α)."""
NUMBERED_UP_TO = 100
"""Patch numbers are printed on grids of at most this many patches (more would be unreadable)."""


def weight_colour_value(weights) -> np.ndarray:
    """Weights α in [0, 1] -> positions on the colour scale, √α."""
    return np.sqrt(np.clip(np.asarray(weights, dtype=np.float64), 0.0, 1.0))


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
                  focus_patch: int | None = None, grid_lines: bool = True,
                  removed: np.ndarray | None = None, numbers: bool = False) -> Image.Image:
    """The image (H, W, 3 uint8) enlarged ``scale`` times, each patch's cell tinted by its
    colour-scale position in [0, 1] (``values``), the cells of ``removed`` patches greyed;
    ground-truth boxes red, the selected patches' box blue, the full pixel box of
    ``focus_patch`` white, and with ``numbers`` each patch's number in its cell."""
    h, w = image.shape[:2]
    xs, ys = cell_edges(grid_boxes, rows, cols, (h, w))
    col_of = np.searchsorted(xs[1:-1], np.arange(w) + 0.5)
    row_of = np.searchsorted(ys[1:-1], np.arange(h) + 0.5)
    cell_values = np.asarray(values, dtype=np.float64).reshape(rows, cols)[row_of][:, col_of]
    tint = colorize(cell_values).astype(np.float64)
    if removed is not None:
        gone = np.asarray(removed, dtype=bool).reshape(rows, cols)[row_of][:, col_of]
        tint[gone] = REMOVED_GREY
        # A removed patch is washed out, not tinted: the picture under it stays faintly visible.
        mix = np.where(gone[..., None], 0.75, alpha)
    else:
        mix = alpha
    mixed = ((1 - mix) * image.astype(np.float64) + mix * tint).round().astype(np.uint8)
    big = Image.fromarray(mixed).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    if grid_lines:
        for x in xs[1:-1]:
            draw.line([(x * scale, 0), (x * scale, h * scale)], fill=(255, 255, 255), width=1)
        for y in ys[1:-1]:
            draw.line([(0, y * scale), (w * scale, y * scale)], fill=(255, 255, 255), width=1)
    if numbers and rows * cols <= NUMBERED_UP_TO:
        for m in range(rows * cols):
            r, c = divmod(m, cols)
            draw.text((xs[c] * scale + 3, ys[r] * scale + 2), str(m), fill=(255, 255, 255),
                      stroke_width=2, stroke_fill=(0, 0, 0))
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
