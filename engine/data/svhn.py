"""SVHN cropped digits: the train and test .mat files, by their exact names (``extra_32x32.mat``
and strays such as ``train_32x32.mat.bak`` are not read; strays are named in a warning)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from engine.data.base import Augment
from engine.data.readers import Decoded, read_mat, resize_tensor_images
from engine.data.registry import DOWNLOAD_HINT, locate_in_bases, register_dataset, with_download
from engine.errors import DataError
from engine.safe_io import BATCH_CAP

SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197)


def read_svhn(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    mat = read_mat(path, "SVHN", BATCH_CAP)
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: expected variables 'X' and 'y'")
    x, y = mat["X"], mat["y"]
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: 'X' must be a 32x32x3xN image array; got "
                        f"{getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3] or y.dtype.kind not in "biuf":
        raise DataError(f"{path}: 'y' must hold one number per image ({x.shape[3]})")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8))
    labels = torch.from_numpy(y.astype(np.int64).reshape(-1) % 10)  # label 10 is digit 0
    return images, labels


def split_file(folder: Path, split: str) -> Path:
    return folder / f"{split}_32x32.mat"


def stray_files(folder: Path, split: str) -> list[str]:
    """Names in ``folder`` that start like the split's file but are not it."""
    own = split_file(folder, split).name
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [n for n in names if n.lower().startswith(own.removesuffix(".mat")) and n != own]


@register_dataset(
    "svhn", description="SVHN cropped digits (train/test .mat; no flips)", multilabel=False,
    native_size=32, mean=SVHN_MEAN, std=SVHN_STD, augment=Augment(4, False), has_boxes=False,
    locate=with_download(locate_in_bases(
        lambda p: (p / "test_32x32.mat").is_file(), "SVHN",
        "Expected train_32x32.mat and test_32x32.mat. " + DOWNLOAD_HINT), "SVHN",
        {"split": "train"}, {"split": "test"}),
    manifest=lambda cfg, folder, split: [split_file(folder, split)],
    ignored=lambda cfg, folder, split: stray_files(folder, split))
def read_split(cfg, folder, split, opts) -> Decoded:
    path = split_file(folder, split)
    if not (path.exists() or path.is_symlink()):  # a FIFO or a broken link: read_mat says so
        raise DataError(f"SVHN: missing {path}")
    images, labels = read_svhn(path)
    return Decoded(resize_tensor_images(images, opts.size), labels, [str(d) for d in range(10)])
