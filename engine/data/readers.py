"""What every data set's reader shares: its options and result (arrays), finding data folders,
decoding many image files, MATLAB files and resizing uint8 batches.

Every reader returns images already at the model input size (uint8) and boxes transformed the
same way, in half-open input-pixel coordinates. Missing or malformed files raise
:class:`DataError` naming the file and what was expected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.errors import DataError, FileRefused
from engine.inputs import BoxTransform, ImageInputError, load_for_model
from engine.roots import inside_roots, open_data
from engine.safe_io import MAT_CAP

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass(frozen=True)
class ReadOptions:
    """How a reader prepares images: the model input side, the resize policy
    (``DataConfig.resize``), whether unreadable files may be skipped, and whether COCO crowd
    regions count as boxes."""

    size: int
    policy: str = "squash"
    skip_unreadable: bool = False
    crowd_boxes: bool = False


@dataclass
class Decoded:
    """What a reader returns: arrays only. The registry adds the data set's name, statistics
    and label kind, which every reader of one data set shares."""

    images: torch.Tensor
    """uint8 (N, C, H, W) at the input size."""
    targets: torch.Tensor
    classes: list[str]
    box_data: torch.Tensor | None = None
    box_offsets: torch.Tensor | None = None
    skipped: tuple[str, ...] = ()
    """``"file: reason"`` of each listed image left out (``skip_unreadable``)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """What the reader counted while it read the annotations, reason -> count (COCO: boxes and
    annotations left out, images whose boxes were rescaled; see :mod:`engine.data.coco`)."""


# ----------------------------------------------------------------------------------------------
# Finding data folders

MAX_WALK_FOLDERS = 2000
"""How many folders a search for a data set may look into before it gives up (a data root set
to ``/`` must fail fast, not walk the disk)."""


def find_folder(bases: Iterable[Path], is_match: Callable[[Path], bool], what: str,
                hint: str, depth: int = 2) -> Path:
    """The first folder that ``is_match`` accepts among ``bases`` and their sub-folders down to
    ``depth`` levels (breadth first, sorted), so a root above the data set's folder works."""
    looked, visited = [], 0
    for base in bases:
        looked.append(str(base))
        level = [base] if base.is_dir() else []
        for _ in range(depth + 1):
            for folder in level:
                visited += 1
                if visited > MAX_WALK_FOLDERS:
                    raise DataError(f"{what} not found within the first {MAX_WALK_FOLDERS} "
                                    f"folders under {looked}; point the data root closer to the "
                                    "data set")
                if is_match(folder):
                    return folder
            # where reads are confined (the app), a search never enters a link that leads out
            level = [c for f in level for c in subfolders(f) if inside_roots(c)]
    raise DataError(f"{what} not found: looked in {looked} and their sub-folders. {hint}")


def subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders, sorted; an unreadable folder has none."""
    try:
        return sorted(c for c in folder.iterdir() if c.is_dir() and not c.name.startswith("."))
    except OSError:
        return []


# ----------------------------------------------------------------------------------------------
# Decoding images (engine.inputs does the work, for data sets and uploads alike)


def decode_files(paths: list[Path], size: int, policy: str, what: str, skip: bool
                 ) -> tuple[list[np.ndarray], list[BoxTransform], list[int], list[str]]:
    """Decode many files. Returns the pixels, box transforms and indices of the readable ones,
    and ``"file: reason"`` for each file that is missing or unreadable.

    A file that cannot be read is an error naming up to 10 of them, unless ``skip`` (the
    ``data.skip_unreadable`` setting), which drops them and reports how many."""
    images, transforms, kept, bad = [], [], [], []
    for i, path in enumerate(paths):
        try:
            pixels, transform = load_for_model(path, size, policy)
        except ImageInputError as exc:
            bad.append(f"{path}: {str(exc).removeprefix(path.name).strip()}")
            continue
        images.append(pixels)
        transforms.append(transform)
        kept.append(i)
    if bad and not skip:
        raise DataError(f"{what}: {len(bad)} of {len(paths)} listed image(s) are missing or "
                        f"unreadable: " + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else "")
                        + ". Fix or remove them, or set data.skip_unreadable=true to go on "
                        "without them (the count is recorded with the run).")
    if bad:
        log.warning("%s: skipped %d missing or unreadable image(s): %s", what, len(bad),
                    "; ".join(bad[:5]))
    return images, transforms, kept, bad


def stack_images(images: list[np.ndarray]) -> torch.Tensor:
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()



def read_mat(path: Path, what: str, cap: int = MAT_CAP) -> dict:
    """A MATLAB file's variables, opened bounded (a regular file within ``cap`` bytes, never a
    FIFO that would hang the read, inside the data roots where reads are confined); an empty,
    text, damaged or refused file is a DataError naming it."""
    from scipy.io import loadmat

    try:
        with open_data(path, cap, f"a MATLAB .mat file ({what})") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise DataError(f"{path} is empty; expected a MATLAB .mat file ({what})")
            return loadmat(fh)
    except DataError:
        raise
    except FileRefused as exc:  # its message names the file and why
        raise DataError(str(exc)) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # scipy raises many types for a damaged file
        raise DataError(f"{path} is not a readable MATLAB .mat file ({what}): "
                        f"{exc.__class__.__name__}") from exc


def resize_tensor_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch (bilinear, antialiased) when the input size differs from native."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)
