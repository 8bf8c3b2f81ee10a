"""Readers of the real data sets in their original layouts, into :class:`ImageSet`.

Every reader returns images already at the model input size (uint8) and boxes transformed the
same way, in half-open input-pixel coordinates. Missing or malformed files raise
:class:`DataError` naming the file and what was expected.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from engine.data.base import ImageSet, pack_boxes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class DataError(ValueError):
    """A data set is missing, incomplete or malformed; the message says where and what."""


# ----------------------------------------------------------------------------------------------
# Finding data folders


def find_folder(bases: Iterable[Path], is_match: Callable[[Path], bool], what: str,
                hint: str, depth: int = 2) -> Path:
    """The first folder that ``is_match`` accepts among ``bases`` and their sub-folders down to
    ``depth`` levels (breadth first, sorted), so a root above the data set's folder works."""
    looked = []
    for base in bases:
        looked.append(str(base))
        level = [base] if base.is_dir() else []
        for _ in range(depth + 1):
            for folder in level:
                if is_match(folder):
                    return folder
            level = [c for f in level for c in sorted(f.iterdir())
                     if c.is_dir() and not c.name.startswith(".")]
    raise DataError(f"{what} not found: looked in {looked} and their sub-folders. {hint}")


# ----------------------------------------------------------------------------------------------
# Decoding and resizing images


def resize_plan(width: int, height: int, size: int, policy: str
                ) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """(resized width, height) and the crop box applied afterwards (None: no crop)."""
    if policy == "squash":
        return (size, size), None
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return (new_w, new_h), (left, top, left + size, top + size)


def load_image(path: Path, size: int, policy: str
               ) -> tuple[np.ndarray, Callable[[tuple[float, ...]], tuple[float, ...] | None]]:
    """Decode any image file to RGB uint8 (size, size, 3); also return the box transform.

    The transform maps an (x0, y0, x1, y1) box of the original image to the output image,
    clipped to it; it returns None for a box that keeps less than half its area after a crop.
    """
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        width, height = img.size
        (new_w, new_h), crop = resize_plan(width, height, size, policy)
        img = img.resize((new_w, new_h), Image.BILINEAR)
        if crop is not None:
            img = img.crop(crop)
        pixels = np.asarray(img, dtype=np.uint8)
    sx, sy = new_w / width, new_h / height
    left, top = (crop[0], crop[1]) if crop else (0, 0)

    def transform(box: tuple[float, ...]) -> tuple[float, ...] | None:
        x0, y0 = box[0] * sx - left, box[1] * sy - top
        x1, y1 = box[2] * sx - left, box[3] * sy - top
        cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, size), min(y1, size)
        if cx1 <= cx0 or cy1 <= cy0:
            return None
        if (cx1 - cx0) * (cy1 - cy0) < 0.5 * (x1 - x0) * (y1 - y0):
            return None
        return (cx0, cy0, cx1, cy1)

    return pixels, transform


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _decode_all(paths: list[Path], size: int, policy: str, what: str) -> tuple[
        list[np.ndarray], list[Callable], list[int]]:
    """Decode many files; unreadable ones are skipped and reported (indices of the kept ones)."""
    from PIL import UnidentifiedImageError

    images, transforms, kept, bad = [], [], [], []
    for i, path in enumerate(paths):
        try:
            pixels, transform = load_image(path, size, policy)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            bad.append(f"{path.name} ({exc.__class__.__name__})")
            continue
        images.append(pixels)
        transforms.append(transform)
        kept.append(i)
    if bad:
        log.warning("%s: skipped %d unreadable image(s): %s", what, len(bad), ", ".join(bad[:5]))
    return images, transforms, kept


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
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable SVHN .mat file: {exc}") from exc
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: expected variables 'X' and 'y'")
    images = torch.from_numpy(np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1)))
    labels = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1) % 10)  # label 10 is digit 0
    return images, labels


def resize_tensor_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch (bilinear, antialiased) when the input size differs from native."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Tiny ImageNet (original layout, with boxes)


def read_tiny_imagenet(root: Path, split: str, size: int, policy: str
                       ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor,
                                  torch.Tensor]:
    wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    names = dict.fromkeys(wnids, "")
    words = root / "words.txt"
    if words.is_file():
        for line in words.read_text().splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in names:
                names[wnid] = text.split(",")[0].strip()
    classes = [names[w] or w for w in wnids]

    entries: list[tuple[Path, int, tuple[float, float, float, float]]] = []
    if split == "train":
        for wnid in wnids:
            box_file = root / "train" / wnid / f"{wnid}_boxes.txt"
            if not box_file.is_file():
                raise DataError(f"Tiny ImageNet: missing {box_file}")
            for line in box_file.read_text().splitlines():
                parts = line.split()
                if len(parts) != 5:
                    continue
                path = root / "train" / wnid / "images" / parts[0]
                entries.append((path, index[wnid], tuple(float(v) for v in parts[1:])))
    else:
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DataError(f"Tiny ImageNet: missing {ann} (the val split is the test set)")
        for line in ann.read_text().splitlines():
            parts = line.split()
            if len(parts) != 6 or parts[1] not in index:
                continue
            entries.append((root / "val" / "images" / parts[0], index[parts[1]],
                            tuple(float(v) for v in parts[2:])))
    if not entries:
        raise DataError(f"Tiny ImageNet under {root}: no {split} images listed")

    images, transforms, kept = _decode_all([e[0] for e in entries], size, policy,
                                           f"tiny_imagenet/{split}")
    labels, boxes = [], []
    for transform, i in zip(transforms, kept, strict=True):
        _, label, (x0, y0, x1, y1) = entries[i]
        labels.append(label)
        box = transform((x0, y0, x1 + 1.0, y1 + 1.0))  # the files give inclusive corners
        boxes.append([(float(label), *box)] if box is not None else [])
    box_data, box_offsets = pack_boxes(boxes)
    return _stack(images), torch.tensor(labels, dtype=torch.long), classes, box_data, box_offsets


# ----------------------------------------------------------------------------------------------
# COCO (pycocotools): 80 classes multi-hot, a box per annotation


def read_coco(root: Path, split: str, size: int, policy: str
              ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """Images with at least one annotation. Crowd annotations count: their class is in the
    image (multi-hot label) and their box marks where (one box for the crowd region)."""
    from pycocotools.coco import COCO

    ann_file = root / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise DataError(f"COCO: missing {ann_file}")
    image_dir = next((d for d in (root / split, root / "images" / split) if d.is_dir()), None)
    if image_dir is None:
        raise DataError(f"COCO: no image folder {root / split} (or {root / 'images' / split})")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(ann_file))
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"COCO: {ann_file} is not a valid instances file: {exc}") from exc
    cat_ids = sorted(coco.getCatIds())
    column = {cat: i for i, cat in enumerate(cat_ids)}
    classes = [coco.loadCats(c)[0]["name"] for c in cat_ids]

    image_ids = sorted(i for i in coco.getImgIds() if coco.getAnnIds(imgIds=i))
    paths = [image_dir / coco.loadImgs(i)[0]["file_name"] for i in image_ids]
    images, transforms, kept = _decode_all(paths, size, policy, f"coco/{split}")
    targets = torch.zeros(len(kept), len(classes))
    boxes = []
    for row, (transform, i) in enumerate(zip(transforms, kept, strict=True)):
        image_boxes = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_ids[i])):
            x, y, w, h = ann["bbox"]
            box = transform((x, y, x + w, y + h))
            if box is None:
                continue  # cropped away (center_crop): the class may still count via another box
            k = column[ann["category_id"]]
            targets[row, k] = 1.0
            image_boxes.append((float(k), *box))
        boxes.append(image_boxes)
    box_data, box_offsets = pack_boxes(boxes)
    return _stack(images), targets, classes, box_data, box_offsets


# ----------------------------------------------------------------------------------------------
# Image folders: one sub-folder per class


def list_class_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {folder}: expected one sub-folder per class; found none")
    files = [(path, k) for k, name in enumerate(classes)
             for path in sorted((folder / name).rglob("*"))
             if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"image folder {folder}: no image files ({sorted(IMAGE_SUFFIXES)}) in "
                        f"its class sub-folders {classes}")
    return classes, files


def read_image_files(files: list[tuple[Path, int]], size: int, policy: str, what: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    images, _, kept = _decode_all([f for f, _ in files], size, policy, what)
    if not images:
        raise DataError(f"{what}: none of the {len(files)} files could be read as an image")
    return _stack(images), torch.tensor([files[i][1] for i in kept], dtype=torch.long)


def as_imageset(name: str, split: str, images: torch.Tensor, targets: torch.Tensor,
                classes: list[str], multilabel: bool, mean, std, box_data=None, box_offsets=None
                ) -> ImageSet:
    return ImageSet(name, split, images, targets, list(classes), multilabel, tuple(mean),
                    tuple(std), box_data, box_offsets)
