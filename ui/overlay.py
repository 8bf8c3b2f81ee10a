"""The app's own picture bits: the gallery strip and CSV bytes.

The patch-weight picture, explanation-map overlays and PNG encoding are :mod:`engine.pictures`
(the command line draws them too). Streamlit-free, so every builder is unit-tested directly.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from engine.fsutil import csv_text


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


def csv_bytes(rows: list[dict]) -> bytes:
    """Rows as UTF-8 CSV, a column for every key any row has (``engine.fsutil.csv_text``)."""
    return csv_text(rows).encode() if rows else b""
