"""Your own images: ``root/<class>/*`` (a seeded 80/20 split), or ``root/train|test/<class>/*``
(``test`` or ``val``), any size and mode."""

from __future__ import annotations

import os
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

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

MAX_CLASS_FOLDERS = 10_000
"""Folders an image-folder walk may enter (a root set to ``/`` fails fast instead)."""


def list_class_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = [p.name for p in subfolders(folder)]
    if not classes:
        raise DataError(f"image folder {folder}: expected one sub-folder per class; found none")
    files, visited = [], 0
    for k, name in enumerate(classes):
        for current, dirs, names in os.walk(folder / name):
            visited += 1
            if visited > MAX_CLASS_FOLDERS:
                raise DataError(f"image folder {folder}: more than {MAX_CLASS_FOLDERS} folders "
                                "below it; is it really one sub-folder per class?")
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [(Path(current) / n, k) for n in sorted(names)
                      if Path(n).suffix.lower() in IMAGE_SUFFIXES and not n.startswith(".")]
    if not files:
        raise DataError(f"image folder {folder}: no image files ({sorted(IMAGE_SUFFIXES)}) in "
                        f"its {len(classes)} class sub-folders")
    return classes, files


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
