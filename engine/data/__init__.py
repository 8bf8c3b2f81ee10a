"""Data sets: a registry of in-memory image sets (image, label(s), boxes) and batch streams.

Each data set is a module that registers itself (``engine/data/<family>.py``); importing this
package imports them all, which is what fills the registry. A new data set is one module, its
import line here, and its test.
"""

from engine.data import cifar, coco, digits, image_folder, svhn, tiny_imagenet  # noqa: F401
from engine.data.base import Augment, BatchStream, ImageSet
from engine.data.registry import (
    augment_of,
    dataset_spec,
    describe,
    input_size_of,
    list_datasets,
    load_split,
)
from engine.errors import DataError

__all__ = [
    "Augment", "BatchStream", "DataError", "ImageSet", "augment_of", "dataset_spec", "describe",
    "input_size_of", "list_datasets", "load_split",
]
