"""COCO instances via pycocotools: 80 classes multi-hot, a box per annotation."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from engine.data.base import Augment, pack_boxes
from engine.data.readers import Decoded, ReadOptions, decode_files, stack_images
from engine.data.registry import locate_in_bases, register_dataset
from engine.errors import DataError


def coco_image_dir(root: Path, split: str) -> Path | None:
    return next((d for d in (root / split, root / "images" / split) if d.is_dir()), None)


def _open_coco(root: Path, split: str):
    from pycocotools.coco import COCO

    ann_file = root / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise DataError(f"COCO: missing {ann_file}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            return COCO(str(ann_file))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"COCO: {ann_file} is not a valid instances file: "
                        f"{exc.__class__.__name__}: {exc}") from exc


def read_coco(root: Path, split: str, opts: ReadOptions) -> Decoded:
    """Images with at least one annotation, as in COCO's own conventions:

    - the image-level labels (multi-hot) come from every annotation of the image, crowd ones
      included, and a crop never drops one;
    - crowd regions (``iscrowd=1``) are not ground-truth boxes for patch metrics and
      localization, as in COCO's evaluation (``opts.crowd_boxes`` counts them)."""
    coco = _open_coco(root, split)
    image_dir = coco_image_dir(root, split)
    if image_dir is None:
        raise DataError(f"COCO: no image folder {root / split} (or {root / 'images' / split})")
    cat_ids = sorted(coco.getCatIds())
    column = {cat: i for i, cat in enumerate(cat_ids)}
    classes = [coco.loadCats(c)[0]["name"] for c in cat_ids]

    image_ids = sorted(i for i in coco.getImgIds() if coco.getAnnIds(imgIds=i))
    paths = [image_dir / coco.loadImgs(i)[0]["file_name"] for i in image_ids]
    images, transforms, kept, skipped = decode_files(paths, opts.size, opts.policy,
                                                     f"coco/{split}", opts.skip_unreadable)
    targets = torch.zeros(len(kept), len(classes))
    boxes = []
    for row, (transform, i) in enumerate(zip(transforms, kept, strict=True)):
        image_boxes = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_ids[i])):
            k = column[ann["category_id"]]
            targets[row, k] = 1.0
            if ann.get("iscrowd", 0) and not opts.crowd_boxes:
                continue
            x, y, w, h = ann["bbox"]
            box = transform((x, y, x + w, y + h))
            if box is not None:  # None: cropped away (center_crop); the label stays
                image_boxes.append((float(k), *box))
        boxes.append(image_boxes)
    box_data, box_offsets = pack_boxes(boxes)
    return Decoded(stack_images(images), targets, classes, box_data, box_offsets, tuple(skipped))


def split_name(cfg, split: str) -> str:
    return (cfg.train_split or "train2017") if split == "train" else (cfg.test_split or "val2017")


def _manifest(cfg, folder: Path, split: str) -> list[Path]:
    name = split_name(cfg, split)
    images = coco_image_dir(folder, name) or folder / name
    return [folder / "annotations" / f"instances_{name}.json", images]


register_dataset(
    "coco", description="COCO instances via pycocotools: 80 classes multi-hot, boxes",
    multilabel=True, native_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, augment=Augment(4, True),
    has_boxes=True,
    locate=locate_in_bases(
        lambda p: any((p / "annotations").glob("instances_*.json")), "COCO",
        "Expected annotations/instances_<split>.json and an image folder <split>/; point "
        "LOSSATTN_DATA or --data-root at it."),
    manifest=_manifest,
)(lambda cfg, folder, split, opts: read_coco(folder, split_name(cfg, split), opts))
