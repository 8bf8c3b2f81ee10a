"""Readers of the real data sets in their original layouts, into arrays (:class:`Decoded`).

Every reader returns images already at the model input size (uint8) and boxes transformed the
same way, in half-open input-pixel coordinates. Missing or malformed files raise
:class:`DataError` naming the file and what was expected.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.data.base import pack_boxes
from engine.inputs import BoxTransform, ImageInputError, load_for_model

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class DataError(ValueError):
    """A data set is missing, incomplete or malformed; the message says where and what."""


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
            level = [c for f in level for c in _subfolders(f)]
    raise DataError(f"{what} not found: looked in {looked} and their sub-folders. {hint}")


def _subfolders(folder: Path) -> list[Path]:
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


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python batches (full or partial) and SVHN .mat files


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; refuse anything but the numpy types they are made of."""

    allowed = frozenset({("numpy.core.multiarray", "_reconstruct"),
                         ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                         ("numpy", "dtype"), ("_codecs", "encode")})

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            data = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise DataError(f"{path} is not a readable CIFAR python batch: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a CIFAR python batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def read_cifar_batches(files: list[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) and labels from python batches. A partial batch (fewer image rows
    than labels, e.g. a truncated download) keeps the labels of the rows present."""
    images, labels = [], []
    for path in files:
        batch = _read_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"{path}: expected keys 'data' and {label_key!r}; "
                            f"found {sorted(batch)}")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: 'data' must be (N, 3072) uint8; got {data.shape}")
        rows = data.shape[0]
        batch_labels = np.asarray(batch[label_key], dtype=np.int64)
        if len(batch_labels) < rows:
            raise DataError(f"{path}: {rows} images but only {len(batch_labels)} labels")
        if len(batch_labels) > rows:
            log.warning("%s is partial: %d of %d images present; using those", path.name, rows,
                        len(batch_labels))
        images.append(data.reshape(rows, 3, 32, 32))
        labels.append(batch_labels[:rows])
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def label_names(meta: Path, key: str, count: int) -> list[str]:
    if meta.is_file():
        names = _read_pickle(meta).get(key)
        if names is not None:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return [str(i) for i in range(count)]


def read_svhn(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    mat = read_mat(path, "SVHN")
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


def read_mat(path: Path, what: str) -> dict:
    """A MATLAB file's variables; an empty, text or damaged file is a DataError naming it."""
    from scipy.io import loadmat

    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path} is empty; expected a MATLAB .mat file ({what})")
    try:
        return loadmat(path)
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


# ----------------------------------------------------------------------------------------------
# Tiny ImageNet (original layout, with boxes)


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
    return Decoded(_stack(images), torch.tensor(labels, dtype=torch.long), classes, box_data,
                   box_offsets, tuple(skipped))


# ----------------------------------------------------------------------------------------------
# COCO (pycocotools): 80 classes multi-hot, a box per annotation


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
    return Decoded(_stack(images), targets, classes, box_data, box_offsets, tuple(skipped))


# ----------------------------------------------------------------------------------------------
# Image folders: one sub-folder per class

MAX_CLASS_FOLDERS = 10_000
"""Folders an image-folder walk may enter (a root set to ``/`` fails fast instead)."""


def list_class_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = [p.name for p in _subfolders(folder)]
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
    return Decoded(_stack(images), torch.tensor([files[i][1] for i in kept], dtype=torch.long),
                   classes, skipped=tuple(skipped))
