"""One way from an image file to a model input, for the data loaders and for a user's upload.

Every image the project reads (a data set's file, an upload in the app, a file given to the CLI)
goes through :func:`decode` and :func:`fit`, so that a model sees at explanation time exactly
what it saw in training:

1. **Open**, with bounds checked before any pixel is decoded: the file's size (uploads), the
   pixel count (:data:`MAX_PIXELS`), the aspect ratio (:data:`MAX_ASPECT`), PIL's decompression
   bombs. An animated image uses its first frame.
2. **Orient** by the EXIF orientation tag, as a viewer shows the photo. Boxes given in the stored
   pixel grid (as COCO's and Tiny ImageNet's are) are turned with the image.
3. **To RGB**: palette and alpha are composited on white, CMYK is converted. 16-bit, 32-bit
   and float greyscale are rescaled by the image's own range (else nearly all of it would clip
   to white); a constant one, which has no range, by its mode's (:func:`high_bit_to_grey`).
4. **Fit** to the input size by the data set's policy: ``squash`` (both sides scaled, every
   object kept) or ``center_crop`` (the centre region with the input's aspect ratio). Bilinear
   resampling, antialiased when shrinking. Only the region that is kept is resampled, so a very
   wide image never makes a huge intermediate.

Anything unusable raises :class:`ImageInputError` with a message a person can act on, never a
Python object's repr.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.config import RESIZE_POLICIES
from engine.errors import FileRefused, ImageInputError

MAX_BYTES = 20 * 2**20
"""Uploads only: data set files on disk may be larger."""
MAX_PIXELS = 40_000_000  # well below PIL's bomb limit; a 6000x6000 photo still fits
MAX_ASPECT = 20.0
"""Longest side / shortest side: beyond this no resize policy keeps a usable picture."""
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_EXIF_ORIENTATION = 0x0112

BoxTransform = Callable[[tuple[float, ...]], tuple[float, float, float, float] | None]


# ----------------------------------------------------------------------------------------------
# Decode


def open_image(source: bytes | str | Path, name: str | None = None):
    """A decoded PIL image (first frame), after every bound is checked. ``source`` is the
    bytes of a file (an upload: its size is bounded too) or a path."""
    from PIL import Image, UnidentifiedImageError

    name = name or (Path(source).name if isinstance(source, str | Path) else "upload")
    if isinstance(source, bytes | bytearray):
        if len(source) == 0:
            raise ImageInputError(f"{name} is empty")
        if len(source) > MAX_BYTES:
            raise ImageInputError(f"{name} is {len(source) / 2**20:.1f} MB; the limit is "
                                  f"{MAX_BYTES // 2**20} MB")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings(), _opened(source, name) as fh:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fh)
            check_size(*image.size, name)
            image.seek(0)
            image.load()
    except ImageInputError:
        raise
    except FileRefused as exc:
        raise ImageInputError(str(exc)) from None
    except FileNotFoundError:
        raise ImageInputError(f"{name} is missing") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"{name} declares far more pixels than any model input needs "
                              f"(a decompression bomb?): {exc}") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{name} is not an image this program can read") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ImageInputError(f"{name} could not be decoded: {detail[:200]}") from None
    return image


def _opened(source, name: str):
    """The file to decode: bytes as they are; a path opened as a data file (a regular file
    within :data:`~engine.safe_io.IMAGE_CAP`, inside the data roots where reads are confined),
    closed once the pixels are loaded."""
    if not isinstance(source, str | Path):
        return contextlib.nullcontext(source)
    from engine.roots import open_data
    from engine.safe_io import IMAGE_CAP

    return open_data(source, IMAGE_CAP, f"an image ({name})")


def check_size(width: int, height: int, name: str) -> None:
    """Refuse sizes that would cost far more memory or time than any model input needs."""
    if width < 1 or height < 1:
        raise ImageInputError(f"{name} has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ImageInputError(f"{name} is {width}x{height} pixels; the limit is "
                              f"{MAX_PIXELS / 1e6:.0f} megapixels")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageInputError(f"{name} is {width}x{height} pixels: an aspect ratio over "
                              f"{MAX_ASPECT:.0f}:1 cannot be fitted to a model input")


def exif_orientation(image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, TypeError):  # a broken EXIF block: ignore it
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def orient_point(x: float, y: float, orientation: int, width: int, height: int
                 ) -> tuple[float, float]:
    """Where a point of the stored pixel grid (``width`` x ``height``) lands once the image
    is shown upright by its EXIF orientation (what PIL's ``exif_transpose`` does to pixels)."""
    return {1: (x, y), 2: (width - x, y), 3: (width - x, height - y), 4: (x, height - y),
            5: (y, x), 6: (height - y, x), 7: (height - y, width - x),
            8: (y, width - x)}[orientation]


HIGH_BIT_WHITE = {"F": 1.0}
"""The value that is white in a high-bit mode, for a constant image: 1.0 for float images (the
usual convention), 65535 for the integer modes (PIL decodes 16-bit files to ``I;16`` or ``I``)."""


def high_bit_to_grey(array: np.ndarray, mode: str) -> np.ndarray:
    """uint8 grey levels of a 16-bit, 32-bit or float greyscale image, stretched over the
    image's own range (its values rarely span the mode's, so most of it would clip to white
    or black). A constant image has no range: it is scaled by the mode's full range instead
    (16-bit 32768 -> 128), so a flat grey stays that grey rather than turning black."""
    low, high = float(array.min()), float(array.max())
    if high > low:
        scaled = (array - low) / (high - low) * 255
    else:
        scaled = array / HIGH_BIT_WHITE.get(mode, 65535.0) * 255
    return np.round(np.clip(np.nan_to_num(scaled), 0, 255)).astype(np.uint8)


def to_rgb(image):
    """RGB by one policy for every mode (see the module docstring)."""
    from PIL import Image

    if image.mode in HIGH_BIT_MODES:
        grey = high_bit_to_grey(np.asarray(image, dtype=np.float64), image.mode)
        image = Image.fromarray(grey, "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode(source: bytes | str | Path, name: str | None = None):
    """Open, orient and convert: an upright RGB PIL image, plus the map of stored-grid points
    to it (for boxes)."""
    from PIL import ImageOps

    image = open_image(source, name)
    orientation = exif_orientation(image)
    width, height = image.size
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image), lambda x, y: orient_point(x, y, orientation, width, height)


# ----------------------------------------------------------------------------------------------
# Fit to the model input


def fit_region(width: int, height: int, out_h: int, out_w: int, policy: str
               ) -> tuple[tuple[float, float, float, float], float, float]:
    """The source region that becomes the input, and the x and y scale factors."""
    if policy == "squash":
        return (0.0, 0.0, float(width), float(height)), out_w / width, out_h / height
    if policy != "center_crop":
        raise ValueError(f"resize policy must be one of {list(RESIZE_POLICIES)}; got {policy!r}")
    scale = max(out_w / width, out_h / height)
    crop_w, crop_h = min(out_w / scale, width), min(out_h / scale, height)
    left, top = max((width - crop_w) / 2, 0.0), max((height - crop_h) / 2, 0.0)
    return (left, top, left + crop_w, top + crop_h), scale, scale


def fit(image, input_size: int | tuple[int, int], policy: str = "squash"
        ) -> tuple[np.ndarray, Callable[[float, float], tuple[float, float]], tuple[int, int]]:
    """uint8 (H, W, 3) pixels at the input size, the map of source points to input points,
    and the input (height, width)."""
    from PIL import Image

    out_h, out_w = (input_size, input_size) if isinstance(input_size, int) else input_size
    width, height = image.size
    region, sx, sy = fit_region(width, height, out_h, out_w, policy)
    resized = image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=region)
    pixels = np.asarray(resized, dtype=np.uint8).copy()
    return pixels, lambda x, y: ((x - region[0]) * sx, (y - region[1]) * sy), (out_h, out_w)


def box_transform(to_upright, to_input, out_size: tuple[int, int]) -> BoxTransform:
    """Map an (x0, y0, x1, y1) box of the stored grid to the input, clipped to it; None for a
    box that keeps less than half its area (after a crop)."""
    out_h, out_w = out_size

    def transform(box: tuple[float, ...]) -> tuple[float, float, float, float] | None:
        corners = [to_input(*to_upright(x, y)) for x, y in ((box[0], box[1]), (box[2], box[3]))]
        x0, x1 = sorted(c[0] for c in corners)
        y0, y1 = sorted(c[1] for c in corners)
        cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, out_w), min(y1, out_h)
        if cx1 <= cx0 or cy1 <= cy0:
            return None
        if (cx1 - cx0) * (cy1 - cy0) < 0.5 * (x1 - x0) * (y1 - y0):
            return None
        return (cx0, cy0, cx1, cy1)

    return transform


def load_for_model(source: bytes | str | Path, input_size: int | tuple[int, int],
                   policy: str = "squash", name: str | None = None
                   ) -> tuple[np.ndarray, BoxTransform]:
    """The whole path: uint8 (H, W, 3) model-input pixels and the box transform. The
    transform's ``stored_size`` is the file's (width, height) before EXIF orientation: the grid
    its boxes are given in, which a reader may check against its annotation's (COCO)."""
    image, to_upright = decode(source, name)
    pixels, to_input, out_size = fit(image, input_size, policy)
    transform = box_transform(to_upright, to_input, out_size)
    # An orientation that transposes (EXIF 5-8) swaps the sides: upright x then follows stored y.
    width, height = image.size
    transposed = to_upright(1, 0)[0] == to_upright(0, 0)[0]
    transform.stored_size = (height, width) if transposed else (width, height)
    return pixels, transform


def image_from_bytes(data: bytes, input_size: tuple[int, int], name: str = "upload",
                     policy: str = "squash"):
    """uint8 (3, H, W) tensor at ``input_size`` from the bytes of an image file, prepared by
    the same ``policy`` as the model's training data (``DataConfig.resize``)."""
    pixels, _ = load_for_model(bytes(data), input_size, policy, name)
    import torch  # after the checks: a refused file never pays for loading torch

    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
