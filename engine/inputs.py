"""A user's own image, made into a model input: any format, size and mode PIL can read.

Policy (the same as a test image's): convert to RGB (palette and alpha are composited on white,
16-bit and float greyscale are rescaled to 8 bits, CMYK is converted), resize the shorter side
to the model's input size, then centre-crop to it. An animated image uses its first frame.
Anything else (not an image, truncated, too many bytes or pixels) raises :class:`ImageInputError`
with a message a person can act on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

MAX_BYTES = 20 * 2**20
MAX_PIXELS = 40_000_000  # well below PIL's bomb limit; a 6000x6000 photo still fits


class ImageInputError(ValueError):
    """The uploaded file cannot be used as an image; the message says why."""


def _to_rgb(image):
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Scale high-bit-depth greyscale by its own range rather than clipping it to white.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        image = Image.fromarray(array.astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_from_bytes(data: bytes, input_size: tuple[int, int], name: str = "upload"
                     ) -> torch.Tensor:
    """uint8 (3, H, W) tensor at ``input_size`` from the bytes of an image file."""
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        raise ImageInputError(f"{name} is empty")
    if len(data) > MAX_BYTES:
        raise ImageInputError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is "
                              f"{MAX_BYTES // 2**20} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageInputError(f"{name} is {width}x{height} pixels; the limit is "
                                      f"{MAX_PIXELS / 1e6:.0f} megapixels")
            image.seek(0)
            image.load()
    except ImageInputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"{name} is not an image this app can read ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageInputError(f"{name} could not be decoded: {exc}") from None
    return fit_image(_to_rgb(image), input_size)


def fit_image(image, input_size: tuple[int, int]) -> torch.Tensor:
    """Shorter side to the input size, centre crop; returns uint8 (3, H, W)."""
    from PIL import Image

    out_h, out_w = input_size
    width, height = image.size
    scale = max(out_w / width, out_h / height)
    size = (max(out_w, round(width * scale)), max(out_h, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - out_w) // 2, (size[1] - out_h) // 2
    image = image.crop((left, top, left + out_w, top + out_h))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
