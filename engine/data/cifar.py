"""CIFAR-10 and CIFAR-100: the python batches (full or partial), read without running
any pickled code."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import torch

from engine.data.base import Augment
from engine.data.readers import Decoded, resize_tensor_images
from engine.data.registry import DOWNLOAD_HINT, locate_in_bases, register_dataset, with_download
from engine.errors import DataError

log = logging.getLogger(__name__)
CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)


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


def _locator(folder_name: str, markers: tuple[str, ...], label: str, download_cls: str):
    return with_download(locate_in_bases(
        lambda p: all((p / m).is_file() for m in markers), label,
        f"Expected {folder_name}/ with {', '.join(markers)}. " + DOWNLOAD_HINT), download_cls)


def _reader(name: str, train_files: str, test_files: str, label_key: str, meta: str,
            meta_key: str):
    def read(cfg, folder, split, opts) -> Decoded:
        pattern = train_files if split == "train" else test_files
        files = sorted(folder.glob(pattern))
        if not files:
            raise DataError(f"{name}: no {pattern} files in {folder}")
        images, labels = read_cifar_batches(files, label_key)
        classes = label_names(folder / meta, meta_key, int(labels.max()) + 1)
        return Decoded(resize_tensor_images(images, opts.size), labels, classes)
    return read


register_dataset(
    "cifar10", description="CIFAR-10 python batches (full or partial)", multilabel=False,
    native_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, augment=Augment(4, True), has_boxes=False,
    locate=_locator("cifar-10-batches-py", ("batches.meta", "test_batch"), "CIFAR-10", "CIFAR10"),
)(_reader("cifar10", "data_batch_*", "test_batch", "labels", "batches.meta", "label_names"))
register_dataset(
    "cifar100", description="CIFAR-100 python files (CIFAR-10 statistics, as the paper)",
    multilabel=False, native_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, augment=Augment(4, True),
    has_boxes=False,
    locate=_locator("cifar-100-python", ("meta", "test"), "CIFAR-100", "CIFAR100"),
)(_reader("cifar100", "train", "test", "fine_labels", "meta", "fine_label_names"))
