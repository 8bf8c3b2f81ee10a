"""Tiny ImageNet in its original layout; the val split (with boxes) is the test set."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.data.base import Augment, pack_boxes
from engine.data.readers import Decoded, ReadOptions, decode_files, stack_images
from engine.data.registry import locate_in_bases, register_dataset
from engine.errors import DataError

TINY_MEAN, TINY_STD = (0.480, 0.448, 0.398), (0.277, 0.269, 0.282)


def _tiny_classes(root: Path) -> tuple[list[str], list[str]]:
    """(wnids, readable names) from wnids.txt and words.txt."""
    wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
    names = dict.fromkeys(wnids, "")
    words = root / "words.txt"
    if words.is_file():
        for line in words.read_text(errors="replace").splitlines():
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
            if not box_file.is_file():
                raise DataError(f"Tiny ImageNet: missing {box_file}")
            for line in box_file.read_text().splitlines():
                parts = line.split()
                if len(parts) == 5:
                    entries.append((root / "train" / wnid / "images" / parts[0], index[wnid],
                                    _numbers(parts[1:], box_file)))
        return entries
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataError(f"Tiny ImageNet: missing {ann} (the val split is the test set)")
    for line in ann.read_text().splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[1] in index:
            entries.append((root / "val" / "images" / parts[0], index[parts[1]],
                            _numbers(parts[2:], ann)))
    return entries


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
)(lambda cfg, folder, split, opts: read_tiny_imagenet(folder, split, opts))
