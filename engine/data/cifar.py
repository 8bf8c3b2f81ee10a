"""CIFAR-10 and CIFAR-100: the python batches (full or partial), read without running
any pickled code.

Only the batches' own names are read (CIFAR-10 ``data_batch_1`` .. ``data_batch_5`` and
``test_batch``, CIFAR-100 ``train`` and ``test``), whichever of them are present: a stray
``data_batch_1.bak`` beside them once became training data. Such strays are named in a
warning instead."""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.data.base import Augment
from engine.data.readers import Decoded, resize_tensor_images
from engine.data.registry import DOWNLOAD_HINT, locate_in_bases, register_dataset, with_download
from engine.errors import DataError, FileRefused
from engine.roots import open_data
from engine.safe_io import BATCH_CAP

log = logging.getLogger(__name__)
CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)


@dataclass(frozen=True)
class CifarLayout:
    """The file names of one CIFAR family, per split, and where its class names are."""

    name: str
    files: dict[str, tuple[str, ...]]
    """The split's batch files, in reading order; those present are read."""
    stray_prefix: dict[str, str]
    """A file whose name starts with this but is not one of ``files`` is a stray, named in a
    warning (a backup, a second download)."""
    label_key: str
    meta: str
    meta_key: str

    def own_files(self, folder: Path, split: str) -> list[Path]:
        """The split's batches present in ``folder`` (a FIFO or link counts as present, so
        that reading it says what it is instead of leaving it out silently)."""
        paths = [folder / name for name in self.files[split]]
        return [p for p in paths if p.exists() or p.is_symlink()]

    def strays(self, folder: Path, split: str) -> list[str]:
        """Names in ``folder`` that look like the split's batches but are not among them."""
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            return []
        prefix = self.stray_prefix[split]
        return [n for n in names if n.lower().startswith(prefix) and n not in self.files[split]]

    def manifest(self, folder: Path, split: str) -> list[Path]:
        """What keys the cache: every name of the split (a missing batch that arrives later
        changes the key) and the class names' file; strays do not."""
        return [folder / name for name in self.files[split]] + [folder / self.meta]


CIFAR10 = CifarLayout("cifar10", {"train": tuple(f"data_batch_{k}" for k in range(1, 6)),
                                  "test": ("test_batch",)},
                      {"train": "data_batch", "test": "test_batch"}, "labels", "batches.meta",
                      "label_names")
CIFAR100 = CifarLayout("cifar100", {"train": ("train",), "test": ("test",)},
                       {"train": "train", "test": "test"}, "fine_labels", "meta",
                       "fine_label_names")


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
    """A CIFAR pickle's dict, opened bounded (a regular file within BATCH_CAP, never a FIFO that
    would hang the read); any failure is a DataError naming the file."""
    try:
        with open_data(path, BATCH_CAP, "a CIFAR python batch") as fh:
            data = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except FileRefused as exc:  # its message names the file and why
        raise DataError(str(exc)) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (EOFError, pickle.UnpicklingError, ValueError) as exc:
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


def _locator(folder_name: str, markers: tuple[str, ...], label: str, download_cls: str):
    return with_download(locate_in_bases(
        lambda p: all((p / m).is_file() for m in markers), label,
        f"Expected {folder_name}/ with {', '.join(markers)}. " + DOWNLOAD_HINT), download_cls)


def _reader(layout: CifarLayout):
    def read(cfg, folder, split, opts) -> Decoded:
        files = layout.own_files(folder, split)
        if not files:
            raise DataError(f"{layout.name}: none of {', '.join(layout.files[split])} in "
                            f"{folder}")
        images, labels = read_cifar_batches(files, layout.label_key)
        classes = label_names(folder / layout.meta, layout.meta_key, int(labels.max()) + 1)
        return Decoded(resize_tensor_images(images, opts.size), labels, classes)
    return read


register_dataset(
    "cifar10", description="CIFAR-10 python batches (full or partial)", multilabel=False,
    native_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, augment=Augment(4, True), has_boxes=False,
    locate=_locator("cifar-10-batches-py", ("batches.meta", "test_batch"), "CIFAR-10", "CIFAR10"),
    manifest=lambda cfg, folder, split: CIFAR10.manifest(folder, split),
    ignored=lambda cfg, folder, split: CIFAR10.strays(folder, split),
)(_reader(CIFAR10))
register_dataset(
    "cifar100", description="CIFAR-100 python files (CIFAR-10 statistics, as the paper)",
    multilabel=False, native_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, augment=Augment(4, True),
    has_boxes=False,
    locate=_locator("cifar-100-python", ("meta", "test"), "CIFAR-100", "CIFAR100"),
    manifest=lambda cfg, folder, split: CIFAR100.manifest(folder, split),
    ignored=lambda cfg, folder, split: CIFAR100.strays(folder, split),
)(_reader(CIFAR100))
