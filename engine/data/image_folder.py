"""Your own images: ``root/<class>/*`` (a seeded 80/20 split), or ``root/train|test/<class>/*``
(``test`` or ``val``), any size and mode."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import torch

from engine.data.base import Augment
from engine.data.readers import (
    IMAGE_SUFFIXES,
    Decoded,
    ReadOptions,
    decode_files,
    stack_images,
    subfolders,
)
from engine.data.registry import register_dataset
from engine.errors import DataError
from engine.roots import check_inside_roots

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

MAX_CLASS_FOLDERS = 10_000
"""Folders an image-folder walk may enter (a root set to ``/`` fails fast instead)."""


def list_class_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class names (sub-folders, sorted) and every (image file, class index) below them.

    Only regular files count as images: a FIFO, socket or device named like an image is left
    out with a warning that counts them (opening a FIFO would wait forever). Where reads are
    confined (the app), a class folder that links outside the data roots is refused here, and
    any file that does is refused where it is opened (:func:`engine.roots.open_data`)."""
    check_inside_roots(folder, "image folder")  # a train/ or test/ that links out
    classes = [p.name for p in subfolders(folder)]
    if not classes:
        raise DataError(f"image folder {folder}: expected one sub-folder per class; found none")
    files, not_files, visited = [], [], 0
    for k, name in enumerate(classes):
        check_inside_roots(folder / name, f"image folder {folder}: class folder")
        for current, dirs, names in os.walk(folder / name):
            visited += 1
            if visited > MAX_CLASS_FOLDERS:
                raise DataError(f"image folder {folder}: more than {MAX_CLASS_FOLDERS} folders "
                                "below it; is it really one sub-folder per class?")
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(names):
                if Path(n).suffix.lower() in IMAGE_SUFFIXES and not n.startswith("."):
                    path = Path(current) / n
                    (files if _is_regular(path) else not_files).append((path, k))
    if not_files:
        log.warning("image folder %s: %d name(s) like an image that are not regular files were "
                    "left out (FIFOs, devices, broken links), e.g. %s", folder, len(not_files),
                    not_files[0][0])
    if not files:
        raise DataError(f"image folder {folder}: no image files ({sorted(IMAGE_SUFFIXES)}) in "
                        f"its {len(classes)} class sub-folders")
    return classes, files


def _is_regular(path: Path) -> bool:
    """A regular file, links followed (a broken link is not)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def read_image_files(files: list[tuple[Path, int]], classes: list[str], opts: ReadOptions,
                     what: str) -> Decoded:
    images, _, kept, skipped = decode_files([f for f, _ in files], opts.size, opts.policy, what,
                                            opts.skip_unreadable)
    if not images:
        raise DataError(f"{what}: none of the {len(files)} files could be read as an image")
    labels = torch.tensor([files[i][1] for i in kept], dtype=torch.long)
    return Decoded(stack_images(images), labels, classes, skipped=tuple(skipped))


def _split_dir(cfg, folder: Path, split: str) -> Path | None:
    names = [cfg.train_split] if split == "train" and cfg.train_split else (
        [cfg.test_split] if split == "test" and cfg.test_split else
        (["train"] if split == "train" else ["test", "val"]))
    return next((folder / n for n in names if (folder / n).is_dir()), None)


def _check_both_splits(cfg, folder: Path) -> None:
    """A folder with train/ but no test/ (or the reverse) is a layout half made, not one class
    named 'train': say so rather than read it as classes."""
    train_dir, test_dir = _split_dir(cfg, folder, "train"), _split_dir(cfg, folder, "test")
    for split_dir in (train_dir, test_dir):
        if split_dir is not None:  # before anything below it is listed
            check_inside_roots(split_dir, "image folder split")
    if (train_dir is None) == (test_dir is None):
        return
    test_names = cfg.test_split or "test/ (or val/)"
    have, missing = ((train_dir.name + "/", test_names) if test_dir is None
                     else (test_dir.name + "/", cfg.train_split or "train/"))
    raise DataError(f"image folder {folder} has {have} but no {missing}: add it, or put the "
                    "class folders directly in the folder for a seeded 80/20 split")


def _locate(cfg) -> Path:
    if not cfg.root:
        raise DataError("image_folder needs root: a folder with train/ and test/ (or val/) "
                        "sub-folders, or one sub-folder per class")
    folder = Path(cfg.root).expanduser()
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    return folder


@register_dataset(
    "image_folder", description="Your images: root/<class>/*.jpg, or root/train|test/<class>",
    multilabel=False, native_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    augment=Augment(4, True), has_boxes=False, locate=_locate)
def read_split(cfg, folder, split, opts) -> Decoded:
    split_dir = _split_dir(cfg, folder, split)
    _check_both_splits(cfg, folder)
    if split_dir is not None:
        classes, files = list_class_folder(split_dir)
        train_dir = _split_dir(cfg, folder, "train")
        if train_dir is not None and split == "test":
            classes_train, _ = list_class_folder(train_dir)
            if classes != classes_train:
                raise DataError(f"image folder {folder}: test classes {classes} differ from "
                                f"train classes {classes_train}")
    else:  # one folder of classes: a seeded 80/20 split
        classes, files = list_class_folder(folder)
        gen = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(files), generator=gen).tolist()
        cut = max(1, round(0.8 * len(files)))
        chosen = sorted(order[:cut] if split == "train" else order[cut:])
        files = [files[i] for i in chosen]
        if not files:
            raise DataError(f"image folder {folder}: too few images for a train/test split")
    return read_image_files(files, classes, opts, f"image folder {folder}")
