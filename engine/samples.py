"""Sample images to try on a digits model: inputs people recognise, drawn here, not downloaded.

Each sample is a PNG (bytes) that goes through exactly the path of an uploaded file
(:func:`engine.inputs.image_from_bytes`), so trying a sample is trying an upload. They are
larger than the model's 32x32 and some are far from the training canvases on purpose: a typed
digit (a font, not handwriting), a small or rotated one, two digits at once, and inputs with no
digit at all, where the Explorer's "unlike the training data" warning should appear.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 96


def _canvas(background=(12, 12, 20)) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), background)


def _digit(image: Image.Image, text: str, size: int, centre: tuple[int, int],
           colour=(240, 240, 240), angle: float = 0.0) -> Image.Image:
    """``text`` in Pillow's bundled font, centred at ``centre``, rotated by ``angle`` degrees."""
    font = ImageFont.load_default(size=size)
    layer = Image.new("L", image.size, 0)
    ImageDraw.Draw(layer).text(centre, text, fill=255, font=font, anchor="mm")
    if angle:
        layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, center=centre)
    image.paste(Image.new("RGB", image.size, colour), (0, 0), layer)
    return image


def _clutter(image: Image.Image, seed: int) -> Image.Image:
    """Strokes and blobs under the digit, like the training canvases' fragments."""
    rng = np.random.default_rng(seed)
    draw = ImageDraw.Draw(image)
    for _ in range(9):
        x, y = rng.integers(0, SIZE, 2)
        w, h = rng.integers(6, 22, 2)
        colour = tuple(int(v) for v in rng.integers(60, 200, 3))
        draw.line([(int(x), int(y)), (int(x + w), int(y + h))], fill=colour, width=3)
    return image


class Sample(NamedTuple):
    truth: str  # what a person sees ("none" where there is no digit)
    draw: Callable[[], Image.Image]  # deterministic


SAMPLES: dict[str, Sample] = {
    "a typed 7": Sample("7", lambda: _digit(_canvas(), "7", 70, (48, 46))),
    "a 3 among clutter": Sample("3", lambda: _digit(_clutter(_canvas(), 3), "3", 60, (46, 48),
                                                    (255, 220, 120))),
    "a small 5 in a corner": Sample("5", lambda: _digit(_canvas(), "5", 34, (70, 70))),
    "a rotated 2": Sample("2", lambda: _digit(_canvas(), "2", 66, (48, 48), angle=35)),
    "two digits, 4 and 9": Sample("4 and 9", lambda: _digit(
        _digit(_canvas(), "4", 44, (26, 30)), "9", 44, (70, 66), (140, 220, 255))),
    "no digit: a ring": Sample("none", lambda: _ring()),
    "no digit: noise": Sample("none", lambda: Image.fromarray(
        np.random.default_rng(7).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))),
}


def _ring() -> Image.Image:
    image = _canvas()
    ImageDraw.Draw(image).ellipse([18, 18, 78, 78], outline=(230, 230, 230), width=9)
    return image


def sample_png(name: str) -> bytes:
    if name not in SAMPLES:
        raise ValueError(f"sample must be one of {list(SAMPLES)}; got {name!r}")
    buffer = io.BytesIO()
    SAMPLES[name].draw().save(buffer, format="PNG")
    return buffer.getvalue()
