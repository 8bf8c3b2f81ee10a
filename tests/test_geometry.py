"""Patch geometry: known boxes for the paper's grids, and consistency with real outputs."""

import pytest
import torch
from torch import nn

from engine.config import ModelConfig
from engine.models import LayerGeom, build_model, compose, patch_grid


def test_layer_geometry_arithmetic():
    layers = [LayerGeom((3, 3), (1, 1), (1, 1)), LayerGeom((3, 3), (2, 2), (1, 1))]
    feature = compose((64, 48), layers)
    assert feature.size == (32, 24) and feature.jump == (2, 2)
    assert LayerGeom.of(nn.Conv2d(1, 1, 5, stride=2, padding=1, dilation=2)) == LayerGeom(
        (5, 5), (2, 2), (1, 1), (2, 2))
    assert LayerGeom((5, 5), dilation=(2, 2)).out_size(20, 0) == 12  # effective kernel 9


def test_paper_grid_32x32():
    grid = build_model(ModelConfig(backbone="resnet18")).grid((32, 32))
    assert (grid.rows, grid.cols, grid.feature_size) == (6, 6, (32, 32))
    expected = torch.tensor([[4 * j, 4 * i, 4 * j + 9, 4 * i + 9]
                             for i in range(6) for j in range(6)])
    assert torch.equal(grid.boxes, expected)  # pixels 29-31 lie in no box, as in the paper


@pytest.mark.parametrize("backbone, plan", [("resnet18", (1, 2, 1, 1)),
                                            ("vgg11_bn", (1, 1, 1, 2, 1, 1, 1, 1))])
def test_paper_grid_64x64_default_plan(backbone, plan):
    model = build_model(ModelConfig(backbone=backbone, input_size=64))
    assert model.config.stride_plan == plan
    grid = model.grid((64, 64))
    expected = torch.tensor([[8 * j, 8 * i, 8 * j + 18, 8 * i + 18]
                             for i in range(6) for j in range(6)])
    assert torch.equal(grid.boxes, expected)


def test_patch_padding_and_clipping():
    feature = compose((20, 20), [])
    grid = patch_grid((20, 20), feature, LayerGeom((5, 5), (5, 5), (2, 2)))
    assert (grid.rows, grid.cols) == (4, 4)
    assert grid.boxes[0].tolist() == [0, 0, 3, 3]       # kernel starts 2 px outside the image
    assert grid.boxes[-1].tolist() == [13, 13, 18, 18]


def test_non_square_input_and_row_major_order():
    model = build_model(ModelConfig(backbone="small_cnn", input_size=(32, 48)))
    out = model(torch.randn(1, 3, 32, 48))
    grid = out.grid
    assert (grid.rows, grid.cols) == (6, 10)
    assert out.patch_weights.shape == (1, 60)
    assert grid.boxes[1].tolist()[0] > grid.boxes[0].tolist()[0]       # m=1 is to the right
    assert grid.boxes[grid.cols].tolist()[1] > grid.boxes[0].tolist()[1]  # m=cols is below


def test_grid_follows_actual_input_size_at_run_time():
    model = build_model(ModelConfig(backbone="small_cnn")).eval()
    for size in (24, 32, 40, 64):
        out = model(torch.randn(1, 3, size, size))
        assert out.patch_weights.shape[1] == out.grid.num_patches
        assert out.grid.boxes[:, 2:].max() <= size
