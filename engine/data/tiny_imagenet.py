"""Tiny ImageNet in its original layout; the val split (with boxes) is the test set.

Only the layout's own files are read: ``wnids.txt``, ``words.txt``, ``train/<wnid>/
<wnid>_boxes.txt`` and ``val/val_annotations.txt``, and the images they list. Strays named like
them (``val_annotations.txt.orig``) and class folders that ``wnids.txt`` does not list are
named in a warning."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.data.base import Augment, pack_boxes
from engine.data.readers import Decoded, ReadOptions, decode_files, stack_images
from engine.data.registry import locate_in_bases, register_dataset
from engine.errors import DataError, FileRefused
from engine.roots import read_data_bytes
from engine.safe_io import TABLE_CAP

TINY_MEAN, TINY_STD = (0.480, 0.448, 0.398), (0.277, 0.269, 0.282)


def read_table(path: Path, what: str, errors: str = "strict") -> str:
    """A text file of the layout, read bounded (a regular file within TABLE_CAP, never a FIFO
    that would hang the read); a missing, refused or non-UTF-8 file is a DataError naming it."""
    try:
        data = read_data_bytes(path, TABLE_CAP, f"Tiny ImageNet's {what}")
    except FileNotFoundError:
        raise DataError(f"Tiny ImageNet: missing {path}") from None
    except FileRefused as exc:  # its message names the file and why
        raise DataError(str(exc)) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return data.decode(errors=errors)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({what}): byte {exc.start}") from None


def _wnids(root: Path) -> list[str]:
    listed = root / "wnids.txt"
    return [_plain(w.strip(), listed) for w in read_table(listed, "class list").split()
            if w.strip()]


def _plain(name: str, listed_in: Path) -> str:
    """A file or folder name a table lists: a plain name, never a path (an absolute name or
    '..' would lead the reader out of the data set's folder)."""
    if "/" in name or "\\" in name or name in (".", ".."):
        raise DataError(f"{listed_in}: {name!r} is not a plain file name (no '/', no '..')")
    return name


def _tiny_classes(root: Path) -> tuple[list[str], list[str]]:
    """(wnids, readable names) from wnids.txt and words.txt."""
    wnids = _wnids(root)
    names = dict.fromkeys(wnids, "")
    words = root / "words.txt"
    if words.exists():  # optional; a FIFO in its place is refused, not skipped
        for line in read_table(words, "class names", errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in names:
                names[wnid] = text.split(",")[0].strip()
    return wnids, [names[w] or w for w in wnids]


def _tiny_entries(root: Path, split: str, wnids: list[str]
                  ) -> list[tuple[Path, int, tuple[float, ...]]]:
    """(image path, class, inclusive box) per listed image of the split."""
    index = {w: i for i, w in enumerate(wnids)}
    entries = []
    if split == "train":
        for wnid in wnids:
            box_file = root / "train" / wnid / f"{wnid}_boxes.txt"
            for line in read_table(box_file, "box list").splitlines():
                parts = line.split()
                if len(parts) == 5:
                    entries.append((root / "train" / wnid / "images" / _plain(parts[0], box_file),
                                    index[wnid],
                                    _numbers(parts[1:], box_file)))
        return entries
    ann = root / "val" / "val_annotations.txt"
    if not (ann.exists() or ann.is_symlink()):
        raise DataError(f"Tiny ImageNet: missing {ann} (the val split is the test set)")
    for line in read_table(ann, "val annotations").splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[1] in index:
            entries.append((root / "val" / "images" / _plain(parts[0], ann), index[parts[1]],
                            _numbers(parts[2:], ann)))
    return entries


def _names_in(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def _like(names: list[str], own: str, prefix: str) -> list[str]:
    """Those of ``names`` that start like ``own`` (``prefix``) but are not it."""
    return [n for n in names if n.lower().startswith(prefix) and n != own]


def tiny_strays(root: Path, split: str) -> list[str]:
    """Files beside the split's own named like them, and for train the class folders that
    ``wnids.txt`` does not list; paths relative to ``root``. Never raises: the reader reports
    any file it cannot read."""
    strays = _like(_names_in(root), "wnids.txt", "wnids")
    if split != "train":
        return strays + [f"val/{n}" for n in _like(_names_in(root / "val"),
                                                      "val_annotations.txt", "val_annotations")]
    try:
        wnids = _wnids(root)
    except DataError:
        return strays
    listed = set(wnids)
    strays += [f"train/{n}/" for n in _names_in(root / "train")
               if n not in listed and not n.startswith(".") and (root / "train" / n).is_dir()]
    for wnid in wnids:
        names = _names_in(root / "train" / wnid)
        strays += [f"train/{wnid}/{n}" for n in _like(names, f"{wnid}_boxes.txt", f"{wnid}_boxes")]
    return strays


def _numbers(texts: list[str], where: Path) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in texts)
    except ValueError:
        raise DataError(f"{where}: expected numbers, got {' '.join(texts)!r}") from None


def read_tiny_imagenet(root: Path, split: str, opts: ReadOptions) -> Decoded:
    wnids, classes = _tiny_classes(root)
    entries = _tiny_entries(root, split, wnids)
    if not entries:
        raise DataError(f"Tiny ImageNet under {root}: no {split} images listed")
    images, transforms, kept, skipped = decode_files(
        [e[0] for e in entries], opts.size, opts.policy, f"tiny_imagenet/{split}",
        opts.skip_unreadable)
    labels, boxes = [], []
    for transform, i in zip(transforms, kept, strict=True):
        _, label, (x0, y0, x1, y1) = entries[i]
        labels.append(label)
        box = transform((x0, y0, x1 + 1.0, y1 + 1.0))  # the files give inclusive corners
        boxes.append([(float(label), *box)] if box is not None else [])
    box_data, box_offsets = pack_boxes(boxes)
    return Decoded(stack_images(images), torch.tensor(labels, dtype=torch.long), classes, box_data,
                   box_offsets, tuple(skipped))


register_dataset(
    "tiny_imagenet", description="Tiny ImageNet, original layout; val (with boxes) = test",
    multilabel=False, native_size=64, mean=TINY_MEAN, std=TINY_STD, augment=Augment(4, True),
    has_boxes=True,
    locate=locate_in_bases(
        lambda p: (p / "wnids.txt").is_file() and (p / "val").is_dir(), "Tiny ImageNet",
        "Expected wnids.txt, train/ and val/ (the original tiny-imagenet-200 layout); point "
        "LOSSATTN_DATA or --data-root at it."),
    manifest=lambda cfg, folder, split: [folder / "wnids.txt", folder / "words.txt",
                                         folder / ("train" if split == "train" else "val")],
    ignored=lambda cfg, folder, split: tiny_strays(folder, split),
)(lambda cfg, folder, split, opts: read_tiny_imagenet(folder, split, opts))
