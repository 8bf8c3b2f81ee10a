"""Patch-grid geometry derived from the layers' kernel, stride, padding and dilation.

Nothing downstream hard-codes 36 patches or a 6x6 grid: the grid size and every patch's pixel box
follow from the backbone's feature map (size and cumulative stride, "jump") and the patch conv.

Pixel boxes are *nominal* (METHOD.md §6): a feature-map cell ``u`` stands for the input pixels
``[u*J, (u+1)*J)`` where ``J`` is the backbone's cumulative stride, and a patch is the union of the
cells under the patch conv's kernel. For the paper's 32x32 model (J=1, 9x9 kernel, stride 4) patch
``(i, j)`` is the 9x9 box starting at ``(4i, 4j)``; at 64x64 with one stride-2 stage (J=2) it is
the 18x18 box starting at ``(8i, 8j)``. The real receptive field is wider (stacked 3x3 convs), so
the box is the paper's notion of a patch, not a receptive field.

Boxes are ``(x0, y0, x1, y1)`` in input pixels, half-open (``x1`` is one past the last column),
clipped to the image.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class LayerGeom:
    """Spatial hyper-parameters of one layer on the main path, per axis (height, width)."""

    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def of(cls, module: nn.Module) -> LayerGeom:
        """Read the geometry of a conv or pooling module."""
        if isinstance(getattr(module, "padding", 0), str):
            raise TypeError(f"string padding {module.padding!r} is not supported by the "
                             "geometry tracer; use explicit ints")
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            dilation = getattr(module, "dilation", 1)
            stride = module.stride if module.stride is not None else module.kernel_size
            return cls(_pair(module.kernel_size), _pair(stride), _pair(module.padding),
                       _pair(dilation))
        raise TypeError(f"no spatial geometry for {type(module).__name__}")

    def effective_kernel(self, axis: int) -> int:
        return self.dilation[axis] * (self.kernel[axis] - 1) + 1

    def out_size(self, size: int, axis: int) -> int:
        span = size + 2 * self.padding[axis] - self.effective_kernel(axis)
        return span // self.stride[axis] + 1


@dataclass(frozen=True)
class MapGeom:
    """A feature map seen from the input: its size and its cumulative stride (jump) per axis."""

    size: tuple[int, int]
    jump: tuple[int, int]


def compose(input_size: tuple[int, int], layers: Iterable[LayerGeom]) -> MapGeom:
    """Apply layers in order (receptive-field arithmetic); raise if the map vanishes."""
    size, jump = list(input_size), [1, 1]
    for layer in layers:
        for axis in (0, 1):
            new = layer.out_size(size[axis], axis)
            if new < 1:
                raise ValueError(
                    f"input_size {tuple(input_size)} is too small: a layer with kernel "
                    f"{layer.kernel} and stride {layer.stride} receives a {size[0]}x{size[1]} map "
                    "and leaves nothing; use a larger input_size or a stride_plan with fewer "
                    "stride-2 stages")
            size[axis] = new
            jump[axis] *= layer.stride[axis]
    return MapGeom((size[0], size[1]), (jump[0], jump[1]))


@dataclass(frozen=True, eq=False)
class PatchGrid:
    """Where each patch lies: grid shape, pixel boxes (row-major, m = i*cols + j)."""

    rows: int
    cols: int
    input_size: tuple[int, int]
    feature_size: tuple[int, int]
    """Size of the feature map *before* the patch conv (the ``"feature_map"`` ξ denominator)."""
    boxes: torch.Tensor
    """(M, 4) int64, ``(x0, y0, x1, y1)`` half-open input-pixel boxes."""

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols

    @property
    def feature_cells(self) -> int:
        return self.feature_size[0] * self.feature_size[1]


def _axis_spans(n_out: int, patch: LayerGeom, axis: int, feature: MapGeom,
                image: int) -> list[tuple[int, int]]:
    """Half-open pixel span of every patch along one axis."""
    jump, cells = feature.jump[axis], feature.size[axis]
    spans = []
    for i in range(n_out):
        first = i * patch.stride[axis] - patch.padding[axis]
        last = first + patch.effective_kernel(axis) - 1
        first, last = max(first, 0), min(last, cells - 1)
        spans.append((min(first * jump, image), min((last + 1) * jump, image)))
    return spans


def patch_grid(input_size: tuple[int, int], feature: MapGeom, patch: LayerGeom) -> PatchGrid:
    """The grid a patch conv ``patch`` makes on the backbone map ``feature``."""
    rows, cols = (patch.out_size(feature.size[a], a) for a in (0, 1))
    if rows < 1 or cols < 1:
        raise ValueError(
            f"input_size {tuple(input_size)} leaves a {feature.size[0]}x{feature.size[1]} feature "
            f"map, smaller than the patch kernel {patch.kernel}: no patch fits. Use a larger "
            "input_size, a stride_plan with fewer stride-2 stages, or a smaller patch_kernel")
    ys = _axis_spans(rows, patch, 0, feature, input_size[0])
    xs = _axis_spans(cols, patch, 1, feature, input_size[1])
    boxes = torch.tensor([[x0, y0, x1, y1] for (y0, y1) in ys for (x0, x1) in xs],
                         dtype=torch.int64)
    return PatchGrid(rows, cols, tuple(input_size), feature.size, boxes)

