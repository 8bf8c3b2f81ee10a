"""Registry of data sets, where their files are looked for, and the decoded-set cache.

Each data set is a module of its own (``engine/data/<family>.py``) that registers its reader
with :func:`register_dataset`; this module imports none of them (``engine.data`` does).

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

from engine.data.base import Augment, ImageSet
from engine.data.readers import Decoded, ReadOptions, find_folder
from engine.errors import ConfigError, DataError
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
    generated: Callable[[DataConfig, str], dict] | None = None
    """For a generated set (``locate`` gives None): the settings that define a split's pixels;
    they key the cache instead of files."""
    default_preset: str | None = None
    """The preset (engine.presets) a run on this set gets when its config names none: the
    digits train live (``live``); the paper's sets keep the recipe defaults, the paper's."""


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, **spec):
    """Function decorator: register ``read(cfg, folder, split, options) -> Decoded`` as the
    reader of data set ``name``; ``spec`` holds the other :class:`DatasetSpec` fields."""
    def decorate(read):
        if name in _DATASETS:
            raise ValueError(f"data set name {name!r} is taken")
        _DATASETS[name] = DatasetSpec(name=name, read=read, **spec)
        return read
    return decorate


def list_datasets() -> list[str]:
    """Registered names: the embedded (generated) sets first, as they need no files."""
    return sorted(_DATASETS, key=lambda name: (_DATASETS[name].generated is None, name))


def dataset_spec(name: object) -> DatasetSpec:
    """The spec of a data set name; raises ConfigError for an unknown one."""
    if not isinstance(name, str) or name not in _DATASETS:
        raise ConfigError(f"data.dataset must be one of {list(_DATASETS)}; got {name!r}")
    return _DATASETS[name]


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


MAX_FINGERPRINT_FOLDERS = 20_000
"""Folders a fingerprint may walk; a data root of ``/`` fails fast instead of walking the disk."""


def fingerprint(paths: list[Path]) -> str:
    """A digest of every file's path, size and modification time under ``paths`` (folders are
    walked whole, through symbolic links as the readers go; a missing path counts as missing,
    so its later arrival changes the digest)."""
    digest = hashlib.sha1()
    folders: set[str] = set()
    for path in paths:
        for entry in _walk_files(path, folders):
            digest.update(entry.encode())
    return digest.hexdigest()


def _walk_files(path: Path, folders: set[str]):
    """``"path size mtime_ns"`` per file at or under ``path``, in a stable order. ``folders``
    holds the real paths walked so far (a link loop is walked once)."""
    try:
        info = path.stat()
    except OSError:
        yield f"{path}\tmissing\n"
        return
    if not path.is_dir():
        yield f"{path}\t{info.st_size}\t{info.st_mtime_ns}\n"
        return
    for current, dirs, names in os.walk(path, followlinks=True):
        real = os.path.realpath(current)
        if real in folders:
            dirs[:] = []
            continue
        folders.add(real)
        if len(folders) > MAX_FINGERPRINT_FOLDERS:
            raise DataError(f"more than {MAX_FINGERPRINT_FOLDERS} folders under {path}; point "
                            "the data root closer to the data set")
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
           "seed": cfg.seed,  # image folders without train/test split by it
           "resize": cfg.resize, "skip_unreadable": cfg.skip_unreadable,
           "crowd_boxes": cfg.crowd_boxes, "folder": str(folder.resolve()) if folder else None,
           "split_name": cfg.train_split if split == "train" else cfg.test_split}
    if folder is None:  # generated: the generator's settings are the source
        key["generated"] = spec.generated(cfg, split) if spec.generated else None
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
# Helpers for the families: locating folders, downloads

DOWNLOAD_HINT = ("Put the files there, point LOSSATTN_DATA or --data-root at their folder, or "
                 "set download=True (--download) when online.")


def locate_in_bases(is_match: Callable[[Path], bool], what: str, hint: str):
    """A ``locate`` that searches the data bases (:func:`data_bases`) for a matching folder."""
    def locate(cfg: DataConfig) -> Path:
        return find_folder(data_bases(cfg), is_match, what, hint)
    return locate


def _download(cfg: DataConfig, dataset_cls: str, **kwargs) -> None:
    import torchvision

    root = data_bases(cfg)[0]
    try:
        getattr(torchvision.datasets, dataset_cls)(str(root), download=True, **kwargs)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"download of {dataset_cls} into {root} failed ({exc}); offline? "
                        "Put the files there by hand instead.") from exc


def with_download(locate, dataset_cls: str, *calls: dict):
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
