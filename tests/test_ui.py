"""The app's Streamlit-free pieces: weight scalings, overlays, figure builders, user images, and
the explorer's engine functions, on hand-built inputs with known answers."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine import inputs, pictures
from engine.config import ModelConfig
from engine.data.base import ImageSet
from engine.evaluate import Collected
from engine.explore import filter_indices, image_story, patch_rows, single_image_cache
from engine.models import PatchOutput, build_model
from engine.models.geometry import PatchGrid
from ui import figures, overlay


def grid_2x2():
    boxes = torch.tensor([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]])
    return PatchGrid(2, 2, (20, 20), (20, 20), boxes)


# ----------------------------------------------------------------------------------------------
# Weight scalings and overlays


def test_fixed_colour_scale_is_sqrt_of_the_weight():
    # √α: the same weight gets the same colour everywhere; out-of-range weights are clipped
    assert pictures.weight_colour_value([0, 0.01, 0.25, 1, 1.5, -0.1]) == pytest.approx(
        [0, 0.1, 0.5, 1, 1, 0])


def test_cell_edges_tile_around_patch_centres():
    grid = grid_2x2()
    xs, ys = pictures.cell_edges(grid.boxes.numpy(), 2, 2, (20, 20))
    assert xs.tolist() == [0, 10, 20] and ys.tolist() == [0, 10, 20]
    # overlapping 12-px patches with stride 4 on a 20-px axis: centres 6, 10, 14
    boxes = torch.tensor([[x, 0, x + 12, 20] for x in (0, 4, 8)])
    xs, _ = pictures.cell_edges(boxes.numpy(), 1, 3, (20, 20))
    assert xs.tolist() == [0, 8, 12, 20]


def test_patch_overlay_colours_each_cell_by_its_value():
    grid = grid_2x2()
    image = np.zeros((20, 20, 3), np.uint8)
    picture = np.asarray(pictures.patch_overlay(image, grid.boxes.numpy(), 2, 2,
                                               np.array([0, 0, 0, 1.0]), alpha=1.0, scale=2,
                                               grid_lines=False))
    assert picture.shape == (40, 40, 3)
    high, low = pictures.colorize(np.array(1.0)), pictures.colorize(np.array(0.0))
    assert (picture[35, 35] == high).all() and (picture[5, 5] == low).all()
    assert (picture[5, 35] == low).all()  # top-right cell is patch 1 (value 0)
    boxed = np.asarray(pictures.patch_overlay(image, grid.boxes.numpy(), 2, 2, np.zeros(4),
                                             alpha=0.0, scale=2, grid_lines=False,
                                             true_boxes=[(0, 0, 10, 10)]))
    assert tuple(boxed[0, 5]) == pictures.BOX_TRUE and tuple(boxed[30, 30]) == (0, 0, 0)


def test_patch_overlay_greys_removed_patches_and_numbers_them():
    grid = grid_2x2()
    image = np.full((20, 20, 3), 200, np.uint8)
    removed = np.array([False, True, False, False])
    picture = np.asarray(pictures.patch_overlay(image, grid.boxes.numpy(), 2, 2,
                                                np.ones(4), alpha=0.5, scale=2,
                                                grid_lines=False, removed=removed))
    grey = np.array(pictures.REMOVED_GREY, dtype=np.float64)
    # removed: 25 % image + 75 % grey; kept: 50 % image + 50 % top colour
    assert picture[5, 35] == pytest.approx(np.round(0.25 * 200 + 0.75 * grey), abs=1)
    assert picture[35, 35] == pytest.approx(
        np.round(0.5 * 200 + 0.5 * pictures.colorize(np.array(1.0))), abs=1)
    numbered = np.asarray(pictures.patch_overlay(image, grid.boxes.numpy(), 2, 2, np.ones(4),
                                                 alpha=0.5, scale=10, grid_lines=False,
                                                 numbers=True))
    plain = np.asarray(pictures.patch_overlay(image, grid.boxes.numpy(), 2, 2, np.ones(4),
                                              alpha=0.5, scale=10, grid_lines=False))
    # each cell's top-left corner carries its number; the rest of the cell is untouched
    for r, c in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        corner = (slice(r * 100, r * 100 + 20), slice(c * 100, c * 100 + 20))
        assert (numbered[corner] != plain[corner]).any()
        assert (numbered[r * 100 + 60:r * 100 + 95, c * 100 + 60:c * 100 + 95]
                == plain[r * 100 + 60:r * 100 + 95, c * 100 + 60:c * 100 + 95]).all()


def test_png_and_csv_bytes():
    png = pictures.png_bytes(pictures.enlarge(np.full((4, 4, 3), 7, np.uint8), 2))
    assert Image.open(io.BytesIO(png)).size == (8, 8)
    text = overlay.csv_bytes([{"patch": 0, "weight": 0.5}, {"patch": 1, "weight": 0.5}]).decode()
    assert text.splitlines() == ["patch,weight", "0,0.5", "1,0.5"]
    assert pictures.to_hwc(torch.zeros(1, 3, 5, dtype=torch.uint8)).shape == (3, 5, 3)


# ----------------------------------------------------------------------------------------------
# Figures


def test_grid_heatmap_places_values_and_fixes_rate_range():
    rows = [{"g": 0, "x": 0.1, "f": 0.5}, {"g": 0, "x": 0.0, "f": 0.25},
            {"g": 0.1, "x": 0.0, "f": 0.75},
            {"g": 0.1, "x": 0.1, "f": float("nan"), "states": {"failed": 1}}]
    fig = figures.grid_heatmap(rows, "x", "g", "f")
    heat = fig.data[0]
    assert list(heat.x) == ["0.0", "0.1"] and list(heat.y) == ["0", "0.1"]
    assert [list(r) for r in heat.z] == [[0.25, 0.5], [0.75, None]]  # a gap, never a 0
    assert (heat.zmin, heat.zmax) == (0, 1)
    assert [list(t) for t in heat.text] == [["0.250", "0.500"], ["0.750<br>best", "failed"]]
    counts = figures.grid_heatmap([{"g": 1, "x": 1, "f": 7.0}], "x", "g", "f")
    assert (counts.data[0].zmin, counts.data[0].zmax) == (0, 7.0)  # a count: 0 to its largest
    # close values stay one colour: the scale is the metric's own range, stated in the title
    close = [{"loss.gamma_max": g, "model.xi": x, "acc": 0.13697 + g / 1000 + x / 10000}
             for g in (0, 0.1) for x in (0, 0.1)]
    fig = figures.grid_heatmap(close, "model.xi", "loss.gamma_max", "acc")
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0, 1) and "0 to 1" in fig.layout.title.text
    assert fig.layout.xaxis.title.text == "ξ" and fig.layout.yaxis.title.text == "γmax"
    assert fig.layout.yaxis.scaleanchor == "x"


def test_grid_heatmap_marks_the_seeds_spread_and_chance():
    """Cells over seeds: mean ± sd; ≈ best where the seeds' range reaches into the best
    cell's; 'learned nothing' at chance accuracy."""
    groups = [{"g": 0, "x": 0, "acc": 0.9, "acc_sd": 0.01, "acc_values": [0.89, 0.9, 0.91]},
              {"g": 1, "x": 0, "acc": 0.895, "acc_sd": 0.02, "acc_values": [0.87, 0.895, 0.92]},
              {"g": 2, "x": 0, "acc": 0.8, "acc_sd": 0.01, "acc_values": [0.79, 0.8, 0.81]},
              {"g": 3, "x": 0, "acc": 0.14, "acc_sd": 0.0, "acc_values": [0.14, 0.14, 0.14]},
              {"g": 4, "x": 0, "states": {"running": 2, "queued": 1}}]
    text = [t[0] for t in figures.grid_heatmap(groups, "x", "g", "acc", chance=0.1).data[0].text]
    assert text[0] == "0.900 ± 0.010<br>best"
    assert text[1] == "0.895 ± 0.020<br>≈ best"        # 0.92 >= 0.89: within the spread
    assert text[2] == "0.800 ± 0.010"                  # 0.81 < 0.89: beyond it
    assert text[3] == "0.140 ± 0.000<br>learned nothing"  # 10 classes: at most 0.15
    assert figures.at_chance(0.55, 0.5) and not figures.at_chance(0.6, 0.5)  # 2 classes
    assert text[4] == "2 running, queued"


def test_curve_figures():
    metrics = [{"epoch": 0, "train_loss": 2.0, "test_acc": 0.5, "train_acc": 0.4},
               {"epoch": 1, "train_loss": 1.0, "test_acc": 0.7, "train_acc": 0.6}]
    fig = figures.training_curves(metrics, "test_acc")
    assert {t.name for t in fig.data} == {"train_loss", "train_acc", "test_acc"}
    assert list(fig.data[0].x) == [1, 2]
    over = figures.metric_overlay({"b": metrics, "a": metrics}, "test_acc")
    assert over.data[0].line.color == figures.PALETTE[1]  # "b" sorts second: stable colours
    curves = {"overall": {"ap": 0.5, "recall": [0, 1], "precision": [1, 0.5]},
              "per_class": [{"class": "cat", "ap": 0.25, "recall": [0, 1], "precision": [1, 0]}]}
    pr = figures.pr_figure(curves, "t", classes=["cat"])
    assert [t.name for t in pr.data] == ["cat (AP 0.250)", "overall (AP 0.500)"]
    assert len(figures.pr_figure(curves, "t", classes=[]).data) == 1


def test_bars_and_stride_figures():
    bars = figures.patch_bars([1.0, -1.0], [0.9, 0.1], [True, False], "logit")
    assert list(bars.data[0].y) == [1.0, -1.0]
    assert bars.data[0].marker.line.color[0] == "black"
    rows = [{"plan": "1,2,1", "accuracy": 0.9, "epoch_s": 10.0, "memory_mb": 100},
            {"plan": "2,2,1", "accuracy": 0.8, "epoch_s": 4.0, "memory_mb": 50},
            {"plan": "x", "accuracy": None, "epoch_s": 1.0}]
    fig = figures.stride_time_figure(rows)
    assert [t.name for t in fig.data] == ["1,2,1", "2,2,1"]
    assert fig.data[0].marker.size > fig.data[1].marker.size
    bench = figures.bench_figure([{"plan": "1,2,1", "images_per_s": 100, "memory_mb": 10}])
    assert list(bench.data[0].y) == [100]


# ----------------------------------------------------------------------------------------------
# A user's own image


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_images_of_any_mode_become_rgb_inputs():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = inputs.image_from_bytes(_png(rgba), (4, 4))
    assert out.shape == (3, 4, 4) and out.dtype == torch.uint8 and (out == 255).all()
    deep = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    out = inputs.image_from_bytes(_png(deep), (8, 8))
    assert out.min() == 0 and out.max() == 255  # 16-bit range rescaled, not clipped
    cmyk = Image.new("CMYK", (10, 10), (0, 0, 0, 0))
    assert inputs.image_from_bytes(_png(cmyk, "JPEG"), (4, 4)).float().mean() > 250
    palette = Image.new("P", (6, 6), 3)
    assert inputs.image_from_bytes(_png(palette, "GIF"), (6, 6)).shape == (3, 6, 6)


def test_wide_image_by_the_models_resize_policy():
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 32:] = 255
    out = inputs.image_from_bytes(_png(Image.fromarray(wide)), (32, 32), policy="center_crop")
    assert (out[:, :, :16] == 0).all() and (out[:, :, 16:] == 255).all()
    squashed = inputs.image_from_bytes(_png(Image.fromarray(wide)), (32, 32))  # the default
    assert (squashed[:, :, :15] == 0).all() and (squashed[:, :, 17:] == 255).all()


def test_bad_uploads_are_clear_errors(monkeypatch):
    with pytest.raises(inputs.ImageInputError, match="notes.txt is not an image"):
        inputs.image_from_bytes(b"hello, not a picture", (32, 32), "notes.txt")
    with pytest.raises(inputs.ImageInputError, match="empty"):
        inputs.image_from_bytes(b"", (32, 32))
    png = _png(Image.new("RGB", (40, 40)))
    with pytest.raises(inputs.ImageInputError, match="could not be decoded|not an image"):
        inputs.image_from_bytes(png[: len(png) // 2], (32, 32), "cut.png")
    monkeypatch.setattr(inputs, "MAX_PIXELS", 100)
    with pytest.raises(inputs.ImageInputError, match="40x40 pixels; the limit"):
        inputs.image_from_bytes(png, (32, 32))
    monkeypatch.setattr(inputs, "MAX_BYTES", 10)
    with pytest.raises(inputs.ImageInputError, match="MB; the limit"):
        inputs.image_from_bytes(png, (32, 32))


# ----------------------------------------------------------------------------------------------
# The explorer's engine functions


def test_filter_indices():
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 0, 0]])
    targets = torch.tensor([0, 2, 2, 1])
    assert filter_indices(logits, targets, False).tolist() == [0, 1, 2, 3]
    assert filter_indices(logits, targets, False, outcome="correct").tolist() == [0, 2]
    assert filter_indices(logits, targets, False, outcome="incorrect").tolist() == [1, 3]
    assert filter_indices(logits, targets, False, true_class=2).tolist() == [1, 2]
    assert filter_indices(logits, targets, False, predicted_class=0,
                          outcome="incorrect").tolist() == [3]
    multi = torch.tensor([[1.0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0]])
    assert filter_indices(logits, multi, True, outcome="correct").tolist() == [0, 2]
    with pytest.raises(ValueError, match="outcome"):
        filter_indices(logits, targets, False, outcome="maybe")


def test_image_story_and_rows():
    grid = grid_2x2()
    model = build_model(ModelConfig(backbone="small_cnn", head="loss_attention"))
    weights = torch.tensor([[0.0, 0.5, 0.0, 0.5]])
    patch_logits = torch.zeros(1, 4, 3)
    patch_logits[0, 1, 2] = 4.0
    patch_logits[0, 3, 1] = 2.0
    logits = (weights[..., None] * patch_logits).sum(1)
    story = image_story(model, PatchOutput(logits, patch_logits, weights, grid), 0, 2, False)
    assert story.predicted == 2 and story.selected.tolist() == [False, True, False, True]
    assert story.selection_box == (10, 0, 20, 20)  # patches 1 and 3: the right column
    assert story.class_logits.tolist() == [0, 4, 0, 0]
    assert story.probabilities.sum() == pytest.approx(1)
    rows = patch_rows(story, ["a", "b", "c"], 2)
    assert rows[1] == {"patch": 1, "row": 0, "col": 1, "x0": 10, "y0": 0, "x1": 20, "y1": 10,
                       "weight": 0.5, "selected": True, "logit_c": 4.0, "patch_prediction": "c"}


def test_single_image_cache_decodes_like_the_model():
    model = build_model(ModelConfig(backbone="small_cnn", head="loss_attention")).eval()
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    data = ImageSet("t", "test", image[None], torch.tensor([0]), list("abcdefghij"), False,
                    (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    cached = single_image_cache(model, image, data)
    assert isinstance(cached, Collected)
    x = (image[None].float() / 255 - 0.5) / 0.25
    for xi in (0.0, 0.6):
        direct = model(x, xi=xi)
        decoded = model.decode_cached(cached.cache, cached.grid, xi)
        assert torch.allclose(decoded.patch_weights, direct.patch_weights, atol=1e-6)
        assert torch.allclose(decoded.logits, direct.logits, atol=1e-5)


def test_local_maps_figure_shares_one_scale_and_writes_rho_in_its_cells():
    from ui.figures import local_maps_figure, transfer_table

    maps = np.stack([np.eye(8), np.ones((8, 8)) * 0.5])
    rho = np.array([[[0.5, -0.25], [1.0, 0.0]]])
    fig = local_maps_figure(maps, rho, ["peer 0", "peer 1"])
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert [t.coloraxis for t in heat[:2]] == ["coloraxis", "coloraxis"]  # one colour scale
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 1
    assert heat[2].zmin == -1 and heat[2].zmax == 1
    assert [list(r) for r in heat[2].text] == [["0.50", "-0.25"], ["1.00", "0.00"]]
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(lines) == 2 * 2  # one inner edge each way on each map (2x2 regions)
    assert {a.text for a in fig.layout.annotations} >= {"peer 0", "ρ per region, peer 1 vs 0"}
    rows_in = {"method": "gradcam", "metric": "average_drop_pct", "seeds": 3,
               "mutual_mean": 10.0, "mutual_std": 1.0, "alone_mean": 12.0, "alone_std": None,
               "difference_mean": -2.0, "difference_std": 0.5, "seeds_better": 3}
    rows = transfer_table([rows_in], {"gradcam": "Grad-CAM"})
    assert rows == [{"map": "Grad-CAM", "metric": "average_drop_pct", "mutual": "10.0 ± 1.0",
                     "alone": "12.0", "mutual - alone": "-2.0 ± 0.5", "seeds better": "3/3"}]
    summary = [{**rows_in, "metric": m} for m in ("average_drop_pct", "deletion_auc")]
    with_paper = transfer_table(summary, {}, {"average_drop_pct": 28.2})
    assert [r["seed paper (its setting)"] for r in with_paper] == ["28.2", ""]
