"""COCO instances via pycocotools: 80 classes multi-hot, a box per annotation.

The annotation file is trusted no further than it is checked:

- It is read bounded (a regular file of at most :data:`~engine.safe_io.ANNOTATION_CAP`, inside
  the data roots where the app confines reads) and parsed here, and every field this reader uses
  is checked before pycocotools indexes it. A malformed file is a :class:`DataError` naming the
  file and the field (``annotations[12].bbox``), never a ``KeyError`` from deep inside.
- An image's ``file_name`` must stay inside the image folder: an absolute name, one with
  ``..``, or a link that leads out is refused (an error naming it and the annotation file, or,
  with ``data.skip_unreadable``, skipped and counted like an unreadable image).

Annotations that are well-formed but unusable are dropped and counted, reason by reason
(:data:`DROP_REASONS`; ``Decoded.dropped``, printed by ``data check`` and recorded with a run):
an annotation of an image id the file does not list; a box with a NaN or infinite number; a box
of zero or negative width or height; a box wholly outside its image. A dropped box's class still
labels its image, as a cropped-away box's does: the category does not depend on the box. A box
partly outside its image is clipped to it.

An image whose pixel size (as stored, before EXIF orientation: the grid COCO's boxes are given
in) differs from its annotation's ``width`` x ``height``:

- with the same shape, up to a pixel of rounding per side, it is a resized copy (datasets are
  often shipped downscaled): its boxes are scaled to its pixels and the image is counted
  (:data:`RESCALED`), with a warning;
- with another shape (rotated, cropped, or another picture) no scaling can place its boxes, so
  it is refused: an error naming it, or skipped and counted with ``data.skip_unreadable``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import reprlib
from pathlib import Path, PurePosixPath

import torch

from engine.data.base import Augment, pack_boxes
from engine.data.readers import Decoded, ReadOptions, decode_files, stack_images
from engine.data.registry import locate_in_bases, register_dataset
from engine.errors import DataError
from engine.inputs import BoxTransform
from engine.roots import read_data_bytes
from engine.safe_io import ANNOTATION_CAP

log = logging.getLogger(__name__)

UNKNOWN_IMAGE = "annotation(s) of an image id not listed in 'images'"
NOT_FINITE = "box(es) with a NaN or infinite number"
EMPTY_BOX = "box(es) of zero or negative width or height"
OUTSIDE = "box(es) wholly outside their image"
DROP_REASONS = (UNKNOWN_IMAGE, NOT_FINITE, EMPTY_BOX, OUTSIDE)
"""Why an annotation or its box is left out; each is counted in ``Decoded.dropped``."""
RESCALED = "image(s) of another pixel size than annotated, same shape (boxes scaled, kept)"
"""Counted in ``Decoded.dropped`` too: nothing is left out, but the boxes were changed."""
MAX_NAMED = 10
"""How many refused images an error names."""
_MISSING = object()

Box = tuple[float, float, float, float]


def coco_image_dir(root: Path, split: str) -> Path | None:
    return next((d for d in (root / split, root / "images" / split) if d.is_dir()), None)


# ----------------------------------------------------------------------------------------------
# The annotation file: read bounded, checked field by field, then indexed by pycocotools


def open_coco(ann_file: Path):
    """The checked annotation file indexed by pycocotools, and the counts of what was dropped
    (:data:`UNKNOWN_IMAGE`, the others at zero: boxes are checked image by image)."""
    from pycocotools.coco import COCO

    data = _read_json(ann_file)
    if not isinstance(data, dict):
        raise DataError(f"COCO annotation file {ann_file}: the top level must be a JSON object "
                        f"with 'images', 'annotations' and 'categories'; got a "
                        f"{type(data).__name__}")
    categories = _check_categories(_section(data, "categories", ann_file), ann_file)
    images = _check_images(_section(data, "images", ann_file), ann_file)
    annotations = _check_annotations(_section(data, "annotations", ann_file), categories,
                                     ann_file)
    known = [a for a in annotations if a["image_id"] in images]
    dropped = dict.fromkeys((*DROP_REASONS, RESCALED), 0)
    dropped[UNKNOWN_IMAGE] = len(annotations) - len(known)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO()
        coco.dataset = {"categories": list(categories.values()),
                        "images": list(images.values()), "annotations": known}
        coco.createIndex()
    return coco, dropped


def _read_json(ann_file: Path):
    try:
        raw = read_data_bytes(ann_file, ANNOTATION_CAP, "a COCO annotation file")
    except FileNotFoundError:
        raise DataError(f"COCO: missing {ann_file}") from None
    except OSError as exc:  # FileRefused (a FIFO, too large, outside the roots) included
        raise DataError(f"COCO annotation file {ann_file} cannot be read: "
                        f"{exc.strerror or exc}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"COCO annotation file {ann_file} is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8; nested beyond Python's stack
        raise DataError(f"COCO annotation file {ann_file} is not readable JSON: "
                        f"{exc.__class__.__name__}") from None


def _problem(ann_file: Path, field: str, expected: str, value: object = _MISSING) -> DataError:
    # reprlib: a whole section given as the wrong type must not be printed (or built) in full
    got = "it is missing" if value is _MISSING else f"got {reprlib.repr(value):.80}"
    return DataError(f"COCO annotation file {ann_file}: {field} must be {expected}; {got}")


def _section(data: dict, key: str, ann_file: Path) -> list:
    value = data.get(key, _MISSING)
    if not isinstance(value, list):
        raise _problem(ann_file, f"'{key}'", "a list", value)
    return value


def _entries(items: list, key: str, ann_file: Path):
    """``(field name, entry)`` of each entry of a section, each checked to be an object."""
    for i, entry in enumerate(items):
        if not isinstance(entry, dict):
            raise _problem(ann_file, f"{key}[{i}]", "an object", entry)
        yield f"{key}[{i}]", entry


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float(value: float) -> float:
    """A JSON number as a float; an integer too large for one is infinite."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _int_field(entry: dict, field: str, name: str, ann_file: Path) -> int:
    value = entry.get(name, _MISSING)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _problem(ann_file, f"{field}.{name}", "an integer", value)
    return value


def _unique_id(entry: dict, field: str, seen: set[int] | dict, ann_file: Path) -> int:
    value = _int_field(entry, field, "id", ann_file)
    if value in seen:
        raise _problem(ann_file, f"{field}.id", "unique", value)
    return value


def _check_categories(items: list, ann_file: Path) -> dict[int, dict]:
    """Category id -> its entry (id and name)."""
    categories: dict[int, dict] = {}
    for field, entry in _entries(items, "categories", ann_file):
        cat_id = _unique_id(entry, field, categories, ann_file)
        if not isinstance(entry.get("name"), str):
            raise _problem(ann_file, f"{field}.name", "text", entry.get("name", _MISSING))
        categories[cat_id] = entry
    return categories


def _check_images(items: list, ann_file: Path) -> dict[int, dict]:
    """Image id -> its entry (id, file_name, width, height)."""
    images: dict[int, dict] = {}
    for field, entry in _entries(items, "images", ann_file):
        image_id = _unique_id(entry, field, images, ann_file)
        name = entry.get("file_name", _MISSING)
        if not isinstance(name, str) or not name or "\0" in name:
            raise _problem(ann_file, f"{field}.file_name", "a file name", name)
        for side in ("width", "height"):
            value = entry.get(side, _MISSING)
            if not (_is_number(value) and math.isfinite(_as_float(value)) and value > 0):
                raise _problem(ann_file, f"{field}.{side}", "a positive number of pixels",
                               value)
        images[image_id] = entry
    return images


def _check_annotations(items: list, categories: dict, ann_file: Path) -> list[dict]:
    """The annotations, each with an image id, a known category, a box of 4 numbers (NaN and
    infinities pass here: they are dropped and counted per image) and iscrowd 0 or 1."""
    seen: set[int] = set()
    for field, entry in _entries(items, "annotations", ann_file):
        seen.add(_unique_id(entry, field, seen, ann_file))
        _int_field(entry, field, "image_id", ann_file)
        category = _int_field(entry, field, "category_id", ann_file)
        if category not in categories:
            raise _problem(ann_file, f"{field}.category_id", "the id of one of 'categories'",
                           category)
        box = entry.get("bbox", _MISSING)
        if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
            raise _problem(ann_file, f"{field}.bbox", "4 numbers [x, y, width, height]", box)
        if entry.get("iscrowd", 0) not in (0, 1):
            raise _problem(ann_file, f"{field}.iscrowd", "0 or 1", entry["iscrowd"])
    return items


# ----------------------------------------------------------------------------------------------
# Images: file names kept in their folder, pixel size against the annotation, boxes


def read_coco(root: Path, split: str, opts: ReadOptions) -> Decoded:
    """Images with at least one annotation, as in COCO's own conventions:

    - the image-level labels (multi-hot) come from every annotation of the image, crowd ones
      included, and a crop never drops one;
    - crowd regions (``iscrowd=1``) are not ground-truth boxes for patch metrics and
      localization, as in COCO's evaluation (``opts.crowd_boxes`` counts them).

    What is checked, refused, dropped and counted: see the module docstring."""
    ann_file = root / "annotations" / f"instances_{split}.json"
    coco, dropped = open_coco(ann_file)
    image_dir = coco_image_dir(root, split)
    if image_dir is None:
        raise DataError(f"COCO: no image folder {root / split} (or {root / 'images' / split})")
    cat_ids = sorted(coco.getCatIds())
    column = {cat: i for i, cat in enumerate(cat_ids)}
    classes = [coco.cats[c]["name"] for c in cat_ids]

    entries = [coco.imgs[i] for i in sorted(coco.getImgIds()) if coco.getAnnIds(imgIds=i)]
    listed, skipped = _listed_paths(entries, image_dir, ann_file, opts.skip_unreadable)
    pixels, transforms, kept, unreadable = decode_files(
        [path for _, path in listed], opts.size, opts.policy, f"coco/{split}",
        opts.skip_unreadable)
    rows, refused = [], []
    for image, transform, i in zip(pixels, transforms, kept, strict=True):
        entry, path = listed[i]
        scale = _grid_scale(transform.stored_size, (entry["width"], entry["height"]))
        if scale is None:
            refused.append(f"{path}: {_size_text(transform.stored_size)} pixels as stored, "
                           f"another shape than the annotated {_size_text(entry)}; its boxes "
                           "cannot be placed")
            continue
        dropped[RESCALED] += scale != (1.0, 1.0)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=entry["id"]))
        rows.append((image, *_image_boxes(anns, column, entry, scale, transform,
                                          opts.crowd_boxes, dropped)))
    skipped += unreadable + _refused(refused, ann_file, opts.skip_unreadable)
    if dropped[RESCALED]:
        log.warning("coco/%s: the boxes of %d image(s) were scaled to their pixel size, which "
                    "differs from the annotated one (a resized copy?)", split, dropped[RESCALED])
    targets = torch.zeros(len(rows), len(classes))
    for row, (_, labels, _) in enumerate(rows):
        targets[row, labels] = 1.0
    box_data, box_offsets = pack_boxes([boxes for _, _, boxes in rows])
    return Decoded(stack_images([image for image, _, _ in rows]), targets, classes, box_data,
                   box_offsets, tuple(skipped), dropped)


def _listed_paths(entries: list[dict], image_dir: Path, ann_file: Path, skip: bool
                  ) -> tuple[list[tuple[dict, Path]], list[str]]:
    """Each image entry with its file's path, where its ``file_name`` stays inside
    ``image_dir``; the others are refused (:func:`_refused`)."""
    real_dir = image_dir.resolve()
    listed, refused = [], []
    for entry in entries:
        name = entry["file_name"]
        why = _leaves_folder(image_dir, real_dir, name)
        if why:
            refused.append(f"file_name {name!r} (image id {entry['id']}) {why}")
        else:
            listed.append((entry, image_dir / name))
    return listed, _refused(refused, ann_file, skip)


def _leaves_folder(image_dir: Path, real_dir: Path, name: str) -> str | None:
    """Why the file ``name`` does not stay inside the image folder, or None where it does. The
    app confines reads to its data roots; this keeps every reader to the data set's own
    folder (a link inside it that points into the same folder is fine)."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        return f"must be a path inside {image_dir}, without '..'"
    try:
        real = (image_dir / name).resolve()
    except (OSError, RuntimeError):  # a loop of links
        return "cannot be resolved (a loop of links?)"
    if not real.is_relative_to(real_dir):
        return f"leads outside {image_dir} (a link?)"
    return None


def _refused(problems: list[str], ann_file: Path, skip: bool) -> list[str]:
    """Refused images as ``"file: reason"`` entries of ``skipped`` (``data.skip_unreadable``),
    else a DataError naming up to :data:`MAX_NAMED` of them and the annotation file."""
    if problems and not skip:
        raise DataError(f"COCO annotation file {ann_file}: {len(problems)} image(s) refused: "
                        + "; ".join(problems[:MAX_NAMED])
                        + (" ..." if len(problems) > MAX_NAMED else "")
                        + ". Fix the annotations or the images, or set data.skip_unreadable=true "
                        "to go on without them (the count is recorded with the run).")
    if problems:
        log.warning("skipped %d image(s) refused by %s: %s", len(problems), ann_file,
                    "; ".join(problems[:5]))
    return problems


def _size_text(size: dict | tuple) -> str:
    width, height = (size["width"], size["height"]) if isinstance(size, dict) else size
    return f"{width:g}x{height:g}"


def _grid_scale(stored: tuple[int, int], annotated: tuple[float, float]
                ) -> tuple[float, float] | None:
    """Factors from the annotated grid to the stored pixels: (1, 1) where they agree, each
    side's for a resized copy of the same shape, None for another shape."""
    (width, height), (ann_w, ann_h) = stored, annotated
    if (width, height) == (ann_w, ann_h):
        return 1.0, 1.0
    # A resize rounds each side to within a pixel of s * its annotated length, which keeps
    # |width * ann_h - height * ann_w| within ann_w + ann_h; a rotated or cropped copy does not.
    if abs(width * ann_h - height * ann_w) > ann_w + ann_h:
        return None
    return width / ann_w, height / ann_h


def _image_boxes(anns: list[dict], column: dict[int, int], entry: dict,
                 scale: tuple[float, float], transform: BoxTransform, crowd_boxes: bool,
                 dropped: dict[str, int]) -> tuple[list[int], list[tuple[float, ...]]]:
    """The class columns of an image's annotations, and its boxes as ``(class, x0, y0, x1, y1)``
    on the model input; a box left out is counted in ``dropped`` by its reason."""
    labels, boxes = [], []
    sx, sy = scale
    for ann in anns:
        k = column[ann["category_id"]]
        labels.append(k)
        if ann.get("iscrowd", 0) and not crowd_boxes:
            continue
        box = _clean_box(ann["bbox"], entry["width"], entry["height"])
        if isinstance(box, str):
            dropped[box] += 1
            continue
        x0, y0, x1, y1 = box
        placed = transform((x0 * sx, y0 * sy, x1 * sx, y1 * sy))
        if placed is not None:  # None: cropped away (center_crop); the label stays
            boxes.append((float(k), *placed))
    return labels, boxes


def _clean_box(bbox: list, width: float, height: float) -> Box | str:
    """COCO's ``[x, y, w, h]`` as ``(x0, y0, x1, y1)`` clipped to its ``width`` x ``height``
    image, or the reason it is dropped (one of :data:`DROP_REASONS`)."""
    x, y, w, h = map(_as_float, bbox)
    if not all(map(math.isfinite, (x, y, w, h))):
        return NOT_FINITE
    if w <= 0 or h <= 0:
        return EMPTY_BOX
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if x1 <= x0 or y1 <= y0:
        return OUTSIDE
    return x0, y0, x1, y1


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
