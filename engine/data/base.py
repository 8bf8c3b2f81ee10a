"""In-memory image sets and the batched, seeded augmentation pipeline.

Every supported data set is decoded once into uint8 tensors at the model's input size, so a
training step never touches PIL or a worker pool. Augmentation (random crop with zero padding,
horizontal flip) and normalisation run on whole batches on the device that holds the images. On
CUDA that is the GPU when the set fits.

Determinism: the order of an epoch comes from ``(seed, epoch)`` and each batch's augmentation from
``(seed, epoch, step)``. So a run resumed in the middle of an epoch sees exactly the batches that
an uninterrupted run would have seen, and ``W`` DDP ranks see the ``W`` slices of the batches of a
single process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class ImageSet:
    """One split of a data set, in memory.

    ``images`` uint8 (N, C, H, W) at the model input size; ``targets`` int64 (N,) class indices,
    or float32 (N, K) multi-hot for multi-label sets; boxes are packed as ``box_data`` float32
    (total, 5) rows ``(class, x0, y0, x1, y1)`` in input-pixel coordinates (half-open) with image
    ``i`` owning rows ``box_offsets[i]:box_offsets[i+1]``; ``None`` when the set has no boxes.
    """

    name: str
    split: str
    images: torch.Tensor
    targets: torch.Tensor
    classes: list[str]
    multilabel: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    box_data: torch.Tensor | None = None
    box_offsets: torch.Tensor | None = None
    skipped: tuple[str, ...] = ()
    """``"file: reason"`` of each listed image that was missing or unreadable and left out
    (only with ``data.skip_unreadable``; otherwise such a file is an error)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> count of what the reader left out or adjusted while it read the annotations
    (COCO: see :mod:`engine.data.coco`); empty for sets without such checks. Like ``skipped``,
    it describes the read, so a subset keeps it."""

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}/{self.split}: images must be uint8 (N, C, H, W)")
        if self.targets.shape[0] != n:
            raise ValueError(f"{self.name}/{self.split}: {n} images but "
                             f"{self.targets.shape[0]} targets")
        if (self.box_data is None) != (self.box_offsets is None):
            raise ValueError("box_data and box_offsets go together")
        if self.box_offsets is not None and self.box_offsets.shape[0] != n + 1:
            raise ValueError(f"{self.name}/{self.split}: box_offsets must have N+1 entries")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int]:
        return (int(self.images.shape[-2]), int(self.images.shape[-1]))

    @property
    def has_boxes(self) -> bool:
        return self.box_data is not None

    def boxes(self, index: int) -> torch.Tensor:
        """(n, 5) boxes of image ``index``: class, x0, y0, x1, y1."""
        if self.box_data is None:
            raise ValueError(f"data set {self.name!r} has no bounding boxes")
        start, end = self.box_offsets[index].item(), self.box_offsets[index + 1].item()
        return self.box_data[start:end]

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """A new set holding the given images (boxes re-packed)."""
        indices = indices.to(torch.long)
        box_data = box_offsets = None
        if self.box_data is not None:
            parts = [self.boxes(int(i)) for i in indices]
            box_data = torch.cat(parts) if parts else self.box_data[:0]
            box_offsets = pack_offsets([len(p) for p in parts])
        return ImageSet(self.name, self.split, self.images[indices], self.targets[indices],
                        self.classes, self.multilabel, self.mean, self.std, box_data, box_offsets,
                        self.skipped, dict(self.dropped))

    def state(self) -> dict:
        """Plain dict of tensors and primitives (loads with ``weights_only=True``)."""
        return {"name": self.name, "split": self.split, "images": self.images,
                "targets": self.targets, "classes": list(self.classes),
                "multilabel": self.multilabel, "mean": list(self.mean), "std": list(self.std),
                "box_data": self.box_data, "box_offsets": self.box_offsets,
                "skipped": list(self.skipped), "dropped": dict(self.dropped)}

    @classmethod
    def from_state(cls, state: dict) -> ImageSet:
        return cls(state["name"], state["split"], state["images"], state["targets"],
                   list(state["classes"]), bool(state["multilabel"]), tuple(state["mean"]),
                   tuple(state["std"]), state["box_data"], state["box_offsets"],
                   tuple(state.get("skipped", ())), dict(state.get("dropped", {})))


def pack_offsets(counts: list[int]) -> torch.Tensor:
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    if counts:
        offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.long), 0)
    return offsets


def pack_boxes(per_image: list[list[tuple[float, float, float, float, float]]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """List (per image) of (class, x0, y0, x1, y1) rows -> (box_data, box_offsets)."""
    rows = [row for boxes in per_image for row in boxes]
    data = torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)
    return data, pack_offsets([len(b) for b in per_image])


@dataclass(frozen=True)
class Augment:
    """Batch augmentation: random crop of the zero-padded image, optional horizontal flip."""

    crop_pad: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_pad > 0 or self.flip


def batch_seed(seed: int, epoch: int, step: int = -1) -> int:
    """A seed for one epoch's order (step = -1) or one batch's augmentation."""
    return (seed * 1_000_003 + epoch * 10_007 + step + 1) % (2**63 - 1)


@dataclass(frozen=True)
class AugmentDraw:
    """The random choices for one batch: crop offsets (B,) and flip flags (B,)."""

    oy: torch.Tensor
    ox: torch.Tensor
    flip: torch.Tensor

    def slice(self, part: torch.Tensor) -> AugmentDraw:
        return AugmentDraw(self.oy[part], self.ox[part], self.flip[part])


def draw_augment(batch: int, augment: Augment, generator: torch.Generator) -> AugmentDraw:
    """Draw a batch's crop offsets and flips (always the same number of draws per batch)."""
    span = 2 * augment.crop_pad + 1
    oy = torch.randint(0, span, (batch,), generator=generator)
    ox = torch.randint(0, span, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    if not augment.flip:
        flip = torch.zeros_like(flip)
    return AugmentDraw(oy, ox, flip)


def apply_augment(images: torch.Tensor, augment: Augment, draw: AugmentDraw) -> torch.Tensor:
    """Per-image crop of the zero-padded uint8 batch, then flip; vectorised, on its device."""
    if not augment.active:
        return images
    b, _, h, w = images.shape
    device = images.device
    if augment.crop_pad > 0:
        p = augment.crop_pad
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        rows = (draw.oy.to(device)[:, None] + torch.arange(h, device=device))[:, :, None]
        cols = (draw.ox.to(device)[:, None] + torch.arange(w, device=device))[:, None, :]
        batch = torch.arange(b, device=device)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if augment.flip:
        flip = draw.flip.to(device).view(b, 1, 1, 1)
        images = torch.where(flip, images.flip(-1), images)
    return images


def model_input(data: ImageSet, images: torch.Tensor,
                device: torch.device | None = None) -> torch.Tensor:
    """The one way images become what a model of ``data`` takes: pixels scaled to [0, 1] (uint8
    images are divided by 255; float images are taken as [0, 1] already), then normalised by the
    data set's mean and std, on ``device`` (default: where the images are)."""
    device = images.device if device is None else device
    x = images.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    return (x - mean) / std


class BatchStream:
    """Batches of one epoch of an :class:`ImageSet` held on ``device``.

    ``rank`` / ``world`` select a contiguous slice of every global batch (DDP). Iterating yields
    ``(x, y, idx)``: normalised float images, targets, and the images' indices in the set.
    """

    def __init__(self, data: ImageSet, batch_size: int, device: torch.device, *,
                 augment: Augment = Augment(), shuffle: bool = False, seed: int = 0,
                 epoch: int = 0, start_step: int = 0, rank: int = 0, world: int = 1,
                 images: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.data, self.batch_size, self.device = data, batch_size, device
        self.augment, self.seed, self.epoch = augment, seed, epoch
        self.start_step, self.rank, self.world = start_step, rank, world
        # Callers may pass the device-resident copies so that they are moved only once.
        self.images = data.images if images is None else images
        self.targets = data.targets if targets is None else targets
        n = len(data)
        if shuffle:
            gen = torch.Generator().manual_seed(batch_seed(seed, epoch))
            self.order = torch.randperm(n, generator=gen)
        else:
            self.order = torch.arange(n)

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for step in range(self.start_step, len(self)):
            idx = self.order[step * self.batch_size:(step + 1) * self.batch_size]
            gen = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, step))
            draw = draw_augment(len(idx), self.augment, gen)
            if self.world > 1:
                part = torch.tensor_split(torch.arange(len(idx)), self.world)[self.rank]
                idx, draw = idx[part], draw.slice(part)
            on_device = idx.to(self.images.device)
            images = apply_augment(self.images[on_device], self.augment, draw)
            x = model_input(self.data, images, self.device)
            yield x, self.targets[on_device].to(self.device, non_blocking=True), idx
