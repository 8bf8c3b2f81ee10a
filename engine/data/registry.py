"""Registry of data sets, where their files are looked for, and the decoded-set cache.

``load_split(DataConfig, "train" | "test")`` returns an :class:`ImageSet` at the model input size.
A decoded split is cached on disk (``$LOSSATTN_CACHE``, default ``~/.cache/loss-attention-studio``)
so that the second load of Tiny ImageNet or COCO takes a moment instead of a decode pass.

The cache key is what was read: the path, size and modification time of every file the split
is made from (each data set's ``manifest``: its annotation files and the whole image folders,
so an added, replaced, edited or newly present image changes the key), plus every setting that
changes the pixels. A stale cache is therefore never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.data import digits, readers
from engine.data.base import Augment, ImageSet
from engine.data.readers import DataError, Decoded, ReadOptions, find_folder
from engine.fsutil import atomic_write, remove_temp_files

if TYPE_CHECKING:
    from engine.config import DataConfig

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: one decode path (engine.inputs), manifest keys, skipped files
SPLITS = ("train", "test")
STALE_TEMP_S = 3600.0
"""Temp files of interrupted cache writes older than this are removed (no write takes so long)."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    multilabel: bool
    native_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment
    """The paper's augmentation at the native size."""
    has_boxes: bool
    locate: Callable[[DataConfig], Path | None]
    """The folder holding the files (``None`` for generated sets); raises DataError if absent."""
    read: Callable[[DataConfig, Path | None, str, ReadOptions], Decoded]
    """``read(cfg, folder, split, options)``: the split's arrays."""
    manifest: Callable[[DataConfig, Path, str], list[Path]] = lambda cfg, folder, split: [folder]
    """Files and folders (walked whole) that the split is read from; they key the cache."""


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in _DATASETS:
        raise ValueError(f"data set name {spec.name!r} is taken")
    _DATASETS[spec.name] = spec
    return spec


def list_datasets() -> list[str]:
    return list(_DATASETS)


def dataset_spec(name: str) -> DatasetSpec:
    check_dataset_name(name)
    return _DATASETS[name]


def check_dataset_name(name: object) -> None:
    from engine.config import ConfigError

    if not isinstance(name, str) or name not in _DATASETS:
        raise ConfigError(f"dataset must be one of {list(_DATASETS)}; got {name!r}")


def data_bases(cfg: DataConfig) -> list[Path]:
    """Folders to search: the config's root, else ``$LOSSATTN_DATA`` and ``./data``."""
    if cfg.root:
        return [Path(cfg.root).expanduser()]
    bases = [Path(os.environ["LOSSATTN_DATA"]).expanduser()] if os.environ.get(
        "LOSSATTN_DATA") else []
    return bases + [Path("data")]


def input_size_of(cfg: DataConfig) -> int:
    return cfg.input_size or dataset_spec(cfg.dataset).native_size


def augment_of(cfg: DataConfig) -> Augment:
    spec = dataset_spec(cfg.dataset)
    if not cfg.augment:
        return Augment()
    pad = round(spec.augment.crop_pad * input_size_of(cfg) / spec.native_size)
    return Augment(pad, spec.augment.flip)


def cache_dir() -> Path:
    return Path(os.environ.get("LOSSATTN_CACHE", "~/.cache/loss-attention-studio")).expanduser()


def fingerprint(paths: list[Path]) -> str:
    """A digest of every file's path, size and modification time under ``paths`` (folders are
    walked whole; a missing path counts as missing, so its later arrival changes the digest)."""
    digest = hashlib.sha1()
    for path in paths:
        for entry in _walk_files(path):
            digest.update(entry.encode())
    return digest.hexdigest()


def _walk_files(path: Path):
    """``"path size mtime_ns"`` per file at or under ``path``, in a stable order."""
    try:
        info = path.stat()
    except OSError:
        yield f"{path}\tmissing\n"
        return
    if not path.is_dir():
        yield f"{path}\t{info.st_size}\t{info.st_mtime_ns}\n"
        return
    for current, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(current, name)
            try:
                stat = os.stat(full)
            except OSError:
                continue
            yield f"{full}\t{stat.st_size}\t{stat.st_mtime_ns}\n"


def _cache_key(cfg: DataConfig, spec: DatasetSpec, folder: Path | None, split: str,
               size: int) -> str:
    key = {"v": CACHE_VERSION, "dataset": spec.name, "split": split, "size": size,
           "resize": cfg.resize, "skip_unreadable": cfg.skip_unreadable,
           "crowd_boxes": cfg.crowd_boxes, "folder": str(folder.resolve()) if folder else None,
           "split_name": cfg.train_split if split == "train" else cfg.test_split}
    if folder is None:  # generated: the generator's settings are the source
        key.update(seed=cfg.seed, count=_digit_count(cfg, split), gen=digits.GENERATOR_VERSION)
    else:
        key["files"] = fingerprint(spec.manifest(cfg, folder, split))
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _load_cached(path: Path) -> ImageSet | None:
    if not path.is_file():
        return None
    try:
        return ImageSet.from_state(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError,
            pickle.UnpicklingError, zipfile.BadZipFile) as exc:  # rebuilt, never trusted
        log.warning("ignoring unreadable cache %s (%s)", path, exc)
        return None


def _save_cached(path: Path, data: ImageSet) -> None:
    try:
        remove_temp_files(path.parent, older_than_s=STALE_TEMP_S, recursive=False)
        atomic_write(path, lambda fh: torch.save(data.state(), fh), durable=False)
    except OSError as exc:
        log.warning("could not write the data cache %s (%s); continuing without", path, exc)


def load_split(cfg: DataConfig, split: str, *, use_cache: bool = True) -> ImageSet:
    """One split of the configured data set at the model input size."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}")
    spec = dataset_spec(cfg.dataset)
    size = input_size_of(cfg)
    folder = spec.locate(cfg)
    path = cache_dir() / f"{spec.name}-{split}-{_cache_key(cfg, spec, folder, split, size)}.pt"
    data = _load_cached(path) if use_cache else None
    if data is None:
        options = ReadOptions(size, cfg.resize, cfg.skip_unreadable, cfg.crowd_boxes)
        decoded = spec.read(cfg, folder, split, options)
        data = ImageSet(spec.name, split, decoded.images, decoded.targets, list(decoded.classes),
                        spec.multilabel, tuple(spec.mean), tuple(spec.std), decoded.box_data,
                        decoded.box_offsets, tuple(decoded.skipped))
        if use_cache:
            _save_cached(path, data)
    if len(data) == 0:
        raise DataError(f"{spec.name}/{split} is empty")
    limit = cfg.train_size if split == "train" else cfg.test_size
    if folder is not None and limit is not None and limit < len(data):
        gen = torch.Generator().manual_seed(cfg.seed)
        data = data.subset(torch.randperm(len(data), generator=gen)[:limit].sort().values)
    return data


def describe(cfg: DataConfig) -> dict:
    """What a model for this data needs: classes, multi-label, input size and channels.

    Reads the smaller (test) split, so it also proves the data is there."""
    data = load_split(cfg, "test")
    return {"num_classes": data.num_classes, "multilabel": data.multilabel,
            "input_size": input_size_of(cfg), "in_chans": int(data.images.shape[1]),
            "classes": data.classes, "has_boxes": data.has_boxes}


# ----------------------------------------------------------------------------------------------
# The built-in data sets

DIGIT_COUNTS = {"train": 12_000, "test": 3_000}


def _digit_count(cfg: DataConfig, split: str) -> int:
    given = cfg.train_size if split == "train" else cfg.test_size
    return given or DIGIT_COUNTS[split]


def _read_digits(multilabel: bool):
    def read(cfg, folder, split, opts):
        data = digits.generate(split, _digit_count(cfg, split), opts.size, multilabel, cfg.seed)
        return Decoded(data.images, data.targets, data.classes, data.box_data, data.box_offsets)
    return read


for _multi in (False, True):
    register_dataset(DatasetSpec(
        name="digits_multilabel" if _multi else "digits",
        description=("Embedded default: 1-3 cluttered handwritten digits, multi-label, boxes"
                     if _multi else "Embedded default: a cluttered handwritten digit, boxes"),
        multilabel=_multi, native_size=32, mean=digits.MEAN, std=digits.STD,
        augment=Augment(crop_pad=2, flip=False), has_boxes=True,
        locate=lambda cfg: None, read=_read_digits(_multi)))


_DOWNLOAD_HINT = ("Put the files there, point LOSSATTN_DATA or --data-root at their folder, or "
                  "set download=True (--download) when online.")


def _cifar_locator(folder_name: str, markers: tuple[str, ...], label: str):
    def locate(cfg):
        return find_folder(data_bases(cfg), lambda p: all((p / m).is_file() for m in markers),
                           label, f"Expected {folder_name}/ with {', '.join(markers)}. "
                           + _DOWNLOAD_HINT)
    return locate


def _download(cfg: DataConfig, dataset_cls: str, **kwargs) -> None:
    import torchvision

    root = data_bases(cfg)[0]
    try:
        getattr(torchvision.datasets, dataset_cls)(str(root), download=True, **kwargs)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"download of {dataset_cls} into {root} failed ({exc}); offline? "
                        "Put the files there by hand instead.") from exc


def _with_download(locate, dataset_cls: str, *calls: dict):
    """``locate``, falling back to torchvision's download when the config asks for it. One
    download per entry of ``calls`` (keyword arguments of the torchvision class): SVHN ships its
    train and test splits as separate files, each its own download."""
    def locate_or_download(cfg):
        try:
            return locate(cfg)
        except DataError:
            if not cfg.download:
                raise
            for kwargs in calls or ({},):
                _download(cfg, dataset_cls, **kwargs)
            return locate(cfg)
    return locate_or_download


def _read_cifar(name: str, train_files: str, test_files: str, label_key: str, meta: str,
                meta_key: str):
    def read(cfg, folder, split, opts):
        pattern = train_files if split == "train" else test_files
        files = sorted(folder.glob(pattern))
        if not files:
            raise DataError(f"{name}: no {pattern} files in {folder}")
        images, labels = readers.read_cifar_batches(files, label_key)
        classes = readers.label_names(folder / meta, meta_key, int(labels.max()) + 1)
        return Decoded(readers.resize_tensor_images(images, opts.size), labels, classes)
    return read


CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)
register_dataset(DatasetSpec(
    name="cifar10", description="CIFAR-10 python batches (full or partial)", multilabel=False,
    native_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, augment=Augment(4, True), has_boxes=False,
    locate=_with_download(
        _cifar_locator("cifar-10-batches-py", ("batches.meta", "test_batch"), "CIFAR-10"),
        "CIFAR10"),
    read=_read_cifar("cifar10", "data_batch_*", "test_batch", "labels", "batches.meta",
                     "label_names")))
register_dataset(DatasetSpec(
    name="cifar100", description="CIFAR-100 python files (CIFAR-10 statistics, as the paper)",
    multilabel=False, native_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, augment=Augment(4, True),
    has_boxes=False,
    locate=_with_download(_cifar_locator("cifar-100-python", ("meta", "test"), "CIFAR-100"),
                          "CIFAR100"),
    read=_read_cifar("cifar100", "train", "test", "fine_labels", "meta", "fine_label_names")))

SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197)


def _read_svhn(cfg, folder, split, opts):
    path = folder / f"{split}_32x32.mat"
    if not path.is_file():
        raise DataError(f"SVHN: missing {path}")
    images, labels = readers.read_svhn(path)
    return Decoded(readers.resize_tensor_images(images, opts.size), labels,
                   [str(d) for d in range(10)])


register_dataset(DatasetSpec(
    name="svhn", description="SVHN cropped digits (train/test .mat; no flips)", multilabel=False,
    native_size=32, mean=SVHN_MEAN, std=SVHN_STD, augment=Augment(4, False), has_boxes=False,
    locate=_with_download(lambda cfg: find_folder(
        data_bases(cfg), lambda p: (p / "test_32x32.mat").is_file(), "SVHN",
        "Expected train_32x32.mat and test_32x32.mat. " + _DOWNLOAD_HINT), "SVHN",
        {"split": "train"}, {"split": "test"}),
    read=_read_svhn,
    manifest=lambda cfg, folder, split: [folder / f"{split}_32x32.mat"]))

TINY_MEAN, TINY_STD = (0.480, 0.448, 0.398), (0.277, 0.269, 0.282)


register_dataset(DatasetSpec(
    name="tiny_imagenet", description="Tiny ImageNet, original layout; val (with boxes) = test",
    multilabel=False, native_size=64, mean=TINY_MEAN, std=TINY_STD, augment=Augment(4, True),
    has_boxes=True,
    locate=lambda cfg: find_folder(
        data_bases(cfg), lambda p: (p / "wnids.txt").is_file() and (p / "val").is_dir(),
        "Tiny ImageNet", "Expected wnids.txt, train/ and val/ (the original tiny-imagenet-200 "
        "layout); point LOSSATTN_DATA or --data-root at it."),
    read=lambda cfg, folder, split, opts: readers.read_tiny_imagenet(folder, split, opts),
    manifest=lambda cfg, folder, split: [folder / "wnids.txt", folder / "words.txt",
                                         folder / ("train" if split == "train" else "val")]))


def _coco_split(cfg: DataConfig, split: str) -> str:
    return (cfg.train_split or "train2017") if split == "train" else (cfg.test_split or "val2017")


def _coco_manifest(cfg: DataConfig, folder: Path, split: str) -> list[Path]:
    name = _coco_split(cfg, split)
    images = readers.coco_image_dir(folder, name) or folder / name
    return [folder / "annotations" / f"instances_{name}.json", images]


register_dataset(DatasetSpec(
    name="coco", description="COCO instances via pycocotools: 80 classes multi-hot, boxes",
    multilabel=True, native_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, augment=Augment(4, True),
    has_boxes=True,
    locate=lambda cfg: find_folder(
        data_bases(cfg), lambda p: any((p / "annotations").glob("instances_*.json")), "COCO",
        "Expected annotations/instances_<split>.json and an image folder <split>/; point "
        "LOSSATTN_DATA or --data-root at it."),
    read=lambda cfg, folder, split, opts: readers.read_coco(folder, _coco_split(cfg, split),
                                                             opts),
    manifest=_coco_manifest))

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _folder_split(cfg: DataConfig, folder: Path, split: str) -> Path | None:
    names = [cfg.train_split] if split == "train" and cfg.train_split else (
        [cfg.test_split] if split == "test" and cfg.test_split else
        (["train"] if split == "train" else ["test", "val"]))
    return next((folder / n for n in names if (folder / n).is_dir()), None)


def _read_folder(cfg, folder, split, opts):
    split_dir = _folder_split(cfg, folder, split)
    if split_dir is not None:
        classes, files = readers.list_class_folder(split_dir)
        train_dir = _folder_split(cfg, folder, "train")
        if train_dir is not None and split == "test":
            classes_train, _ = readers.list_class_folder(train_dir)
            if classes != classes_train:
                raise DataError(f"image folder {folder}: test classes {classes} differ from "
                                f"train classes {classes_train}")
    else:  # one folder of classes: a seeded 80/20 split
        classes, files = readers.list_class_folder(folder)
        gen = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(files), generator=gen).tolist()
        cut = max(1, round(0.8 * len(files)))
        chosen = sorted(order[:cut] if split == "train" else order[cut:])
        files = [files[i] for i in chosen]
        if not files:
            raise DataError(f"image folder {folder}: too few images for a train/test split")
    return readers.read_image_files(files, classes, opts, f"image folder {folder}")


def _locate_folder(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError("image_folder needs root: a folder with train/ and test/ (or val/) "
                        "sub-folders, or one sub-folder per class")
    folder = Path(cfg.root).expanduser()
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    return folder


register_dataset(DatasetSpec(
    name="image_folder", description="Your images: root/<class>/*.jpg, or root/train|test/<class>",
    multilabel=False, native_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    augment=Augment(4, True), has_boxes=False, locate=_locate_folder, read=_read_folder))
