"""Data sets: a registry of in-memory image sets (image, label(s), boxes) and batch streams."""

from engine.data.base import Augment, BatchStream, ImageSet
from engine.data.readers import DataError
from engine.data.registry import (
    augment_of,
    dataset_spec,
    describe,
    input_size_of,
    list_datasets,
    load_split,
)

__all__ = [
    "Augment", "BatchStream", "DataError", "ImageSet", "augment_of", "dataset_spec", "describe",
    "input_size_of", "list_datasets", "load_split",
]
