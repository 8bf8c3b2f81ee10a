"""Registry of data sets, where their files are looked for, and the decoded-set cache.

Each data set is a module of its own (``engine/data/<family>.py``) that registers its reader
with :func:`register_dataset`; this module imports none of them (``engine.data`` does).

``load_split(DataConfig, "train" | "test")`` returns an :class:`ImageSet` at the model input size.
A decoded split is cached on disk (``$LOSSATTN_CACHE``, default ``~/.cache/loss-attention-studio``)
so that the second load of Tiny ImageNet or COCO takes a moment instead of a decode pass.

The cache key is what was read: the path, size, modification time, change time and inode of
every file the split is made from (each data set's ``manifest``: its annotation files and the
whole image folders, so an added, replaced, edited or newly present image changes the key), the
content of the manifest's named files up to :data:`CONTENT_HASH_CAP` (a CIFAR batch, an
annotation file), plus every setting that changes the pixels. A stale cache is therefore never
served, even when a file is overwritten and its size and modification time are put back
(``cp -p`` of an equal-size batch): the change time cannot be put back, and the content of the
small named files is compared outright where change times are coarse or not kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import stat
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
from engine.roots import check_data_folder, confinement_tag, open_data
from engine.safe_io import MiB, kind_of

if TYPE_CHECKING:
    from engine.config import DataConfig

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # 2: one decode path, manifest keys, skipped files; 3: ctime, inode, content
# in the key, exact file names, a constant 16-bit image kept grey (engine.train records this
# number with a checkpoint: a resume across it warns that it is not bit-exact)
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
    ignored: Callable[[DataConfig, Path, str], list[str]] = lambda cfg, folder, split: []
    """Stray files beside the split's own, named like them (``data_batch_1.bak``), that the
    reader leaves out. :func:`load_split` names them in a warning on every load, a cached one
    too, so that nobody wonders whether they were read."""
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


CONTENT_HASH_CAP = 64 * MiB
"""A file named in a manifest (not one found by walking a folder) up to this size is keyed on
its content too: a CIFAR batch (31 MB), COCO's val annotations (25 MB), SVHN's test file (61
MB), Tiny ImageNet's ``wnids.txt``. Hashing them costs about 20 ms per 31 MB on each load;
larger files (COCO's train annotations, 448 MB) would cost seconds, and rely on the change
time and inode like every image."""


def fingerprint(paths: list[Path]) -> str:
    """A digest of every file's path, size, modification and change time and inode under
    ``paths`` (folders are walked whole, through symbolic links as the readers go), and of the
    content of the files ``paths`` names directly, up to :data:`CONTENT_HASH_CAP`. A missing
    path counts as missing, so its later arrival changes the digest. A FIFO, device or socket
    is keyed by its name and kind only: it is never opened."""
    digest = hashlib.sha1()
    folders: set[str] = set()
    for path in paths:
        for entry in _walk_files(path, folders):
            digest.update(entry.encode())
    return digest.hexdigest()


def _file_entry(path: str, info: os.stat_result, content: str = "") -> str:
    """One line of the fingerprint. The change time and inode are there because ``cp -p``,
    ``touch -r`` or an archive extraction put back the size and modification time of a file
    that was overwritten, but the kernel stamps the change time on every write and ``utime``
    and no call sets it back, and a file replaced by a rename has another inode. The device
    number is left out: it changes when a disk is mounted again, which would throw the cache
    away for nothing."""
    if not stat.S_ISREG(info.st_mode):
        return f"{path}\t{kind_of(info.st_mode)}\n"
    return (f"{path}\t{info.st_size}\t{info.st_mtime_ns}\t{info.st_ctime_ns}\t{info.st_ino}"
            f"\t{content}\n")


def content_digest(path: Path, info: os.stat_result) -> str:
    """sha256 of a regular file of at most :data:`CONTENT_HASH_CAP` bytes, read bounded and
    without blocking (:func:`engine.roots.open_data`); ``""`` for a larger file and
    ``"unreadable"`` for one that cannot be read (the reader then says why)."""
    if not stat.S_ISREG(info.st_mode) or info.st_size > CONTENT_HASH_CAP:
        return ""
    digest = hashlib.sha256()
    try:
        with open_data(path, CONTENT_HASH_CAP, "a data file") as fh:
            while chunk := fh.read(MiB):
                digest.update(chunk)
    except OSError:
        return "unreadable"
    return digest.hexdigest()


def _walk_files(path: Path, folders: set[str]):
    """One :func:`_file_entry` per file at or under ``path``, in a stable order. ``folders``
    holds the real paths walked so far (a link loop is walked once)."""
    try:
        info = path.stat()
    except OSError:
        yield f"{path}\tmissing\n"
        return
    if not stat.S_ISDIR(info.st_mode):
        yield _file_entry(str(path), info, content_digest(path, info))
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
                info = os.stat(full)
            except OSError:
                continue
            yield _file_entry(full, info)


def warn_ignored(spec: DatasetSpec, cfg: DataConfig, folder: Path | None, split: str) -> None:
    """Log which stray files beside the split's own were left out (``DatasetSpec.ignored``)."""
    strays = spec.ignored(cfg, folder, split) if folder is not None else []
    if strays:
        log.warning("%s/%s: ignored %d file(s) in %s named like its own but not among them: %s",
                    spec.name, split, len(strays), folder, ", ".join(strays[:10])
                    + (" ..." if len(strays) > 10 else ""))


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
    if cfg.root:  # before any search lists what lies below it
        check_data_folder(Path(cfg.root).expanduser(), f"the data folder of {spec.name}")
    folder = spec.locate(cfg)
    if folder is not None:
        check_data_folder(folder, f"the {spec.name} folder found")
    warn_ignored(spec, cfg, folder, split)
    key = _cache_key(cfg, spec, folder, split, size)
    # a generated set reads no file: the same for a confined process as for any other
    tag = confinement_tag() if folder is not None else ""
    path = cache_dir() / f"{spec.name}-{split}-{key}{tag}.pt"
    data = _load_cached(path) if use_cache else None
    if data is None:
        options = ReadOptions(size, cfg.resize, cfg.skip_unreadable, cfg.crowd_boxes)
        decoded = spec.read(cfg, folder, split, options)
        data = ImageSet(spec.name, split, decoded.images, decoded.targets, list(decoded.classes),
                        spec.multilabel, tuple(spec.mean), tuple(spec.std), decoded.box_data,
                        decoded.box_offsets, tuple(decoded.skipped), dict(decoded.dropped))
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
