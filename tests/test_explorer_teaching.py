"""The Patch Explorer's teaching pieces on hand-built tensors with known answers: what ξ cuts,
Eq. 5 term by term, the patch map's colours and greyed patches, the ablation pair, the cards."""

import math

import numpy as np
import pytest
import torch

from engine import pictures
from engine.config import ModelConfig, RunConfig, config_to_dict
from engine.evaluate import Collected
from engine.explore import (
    patch_loss_partner,
    prediction_breakdown,
    threshold_view,
)
from engine.models import PatchOutput, build_model
from engine.models.geometry import PatchGrid
from ui.explorer_figures import (
    REMOVED_COLOUR,
    breakdown_latex,
    breakdown_rows,
    patch_map_figure,
    sorted_scores_figure,
)


def grid_2x2():
    boxes = torch.tensor([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]])
    return PatchGrid(2, 2, (20, 20), (20, 20), boxes)


def known_output():
    """Four patches, three classes: α = (0.6, 0.3, 0.1, 0); O chosen by hand."""
    alpha = torch.tensor([[0.6, 0.3, 0.1, 0.0]])
    patch_logits = torch.tensor([[[5.0, 1.0, 0.0], [2.0, 4.0, 0.0], [1.0, 1.0, 1.0],
                                  [9.0, 9.0, 9.0]]])
    logits = (alpha[..., None] * patch_logits).sum(1)  # (3.7, 1.9, 0.1)
    return PatchOutput(logits, patch_logits, alpha, grid_2x2())


def test_breakdown_is_eq5_term_by_term():
    out = known_output()
    b = prediction_breakdown(out, 0, False, patches=2, classes=2)
    assert b.patches == [0, 1] and b.classes == [0, 1]
    assert b.weights == pytest.approx([0.6, 0.3])
    assert b.logits == [[5.0, 1.0], [2.0, 4.0]]
    # the other patches: patch 2 (α 0.1) and the removed patch 3 (α 0), whose 9s add nothing
    assert b.rest_count == 2 and b.rest_weight == pytest.approx(0.1)
    assert b.rest == pytest.approx([0.1, 0.1])
    assert b.z == pytest.approx([3.7, 1.9]) and b.exact
    expected = np.exp([3.7, 1.9]) / np.exp([3.7, 1.9, 0.1]).sum()
    assert b.probabilities == pytest.approx(expected.tolist())
    # only kept patches are listed, however many are asked for
    assert prediction_breakdown(out, 0, False, patches=10).patches == [0, 1, 2]


def test_breakdown_says_when_the_head_is_not_a_weighted_sum():
    out = known_output()
    capsule_like = PatchOutput(out.logits + 1.0, out.patch_logits, out.patch_weights, out.grid)
    assert not prediction_breakdown(capsule_like, 0, False).exact
    with pytest.raises(ValueError, match="no patch logits"):
        prediction_breakdown(PatchOutput(out.logits, None, None, None), 0, False)


def test_breakdown_table_columns_sum_to_z_and_latex_shows_the_numbers():
    out = known_output()
    b = prediction_breakdown(out, 0, False, patches=2, classes=3)
    rows = breakdown_rows(b, ["a", "b", "c"])
    assert [r["term"] for r in rows] == ["patch 0", "patch 1", "the other 2 patches",
                                         "z = Σ α·O", "softmax(z) over all classes"]
    for name in "abc":
        terms = sum(float(r[f"α·O[{name}]"]) for r in rows[:3])
        assert terms == pytest.approx(float(rows[3][f"α·O[{name}]"]), abs=0.011)
    assert rows[0]["O[a]"] == "5.00" and rows[0]["α·O[a]"] == "3.00"
    assert rows[2]["O[a]"] == ""  # a sum of patches has no single logit
    latex = breakdown_latex(b, ["a", "b", "c"])
    assert r"0.600\times5.00" in latex and r"0.300\times2.00" in latex
    assert "= 3.70" in latex and "other 2" in latex and r"\mathrm{softmax}" in latex
    assert r"\sigma" in breakdown_latex(b, ["a", "b", "c"], multilabel=True)


def test_threshold_view_is_the_share_of_logit_norms_and_xi_over_m():
    model = build_model(ModelConfig(backbone="small_cnn", head="loss_attention"))
    patch_logits = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [6.0, 8.0], [0.0, 5.0]]])
    collected = Collected({"patch_logits": patch_logits}, grid_2x2(), 0.0)
    out = model.decode_cached(collected.cache, collected.grid, 0.5)
    view = threshold_view(model, collected, out, 0, 0.5)
    assert view.scores.tolist() == pytest.approx([0.25, 0.0, 0.5, 0.25])  # norms 5, 0, 10, 5
    assert view.cut == pytest.approx(0.5 / 4) and view.cut_name == "θ = ξ/M"
    kept = (view.scores > view.cut).tolist()
    assert kept == (out.patch_weights[0] > 0).tolist() == [True, False, True, True]


def test_threshold_view_of_a_baseline_is_its_weights_against_one_over_m():
    model = build_model(ModelConfig(backbone="small_cnn", head="attention"))
    weights = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    out = PatchOutput(torch.zeros(1, 2), torch.zeros(1, 4, 2), weights, grid_2x2())
    view = threshold_view(model, Collected({}, grid_2x2(), 0.0), out, 0, 0.1)
    assert view.scores.tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert view.cut == pytest.approx(0.25) and view.cut_name == "1/M"


def test_patch_map_colours_kept_patches_on_the_fixed_scale_and_greys_the_rest():
    image = np.zeros((20, 20, 3), np.uint8)
    fig = patch_map_figure(image, grid_2x2().boxes.numpy(), 2, 2, [0.64, 0.36, 0.0, 0.0],
                           [True, True, False, False], true_boxes=[(0, 0, 10, 10)],
                           selection_box=(0, 0, 20, 10))
    picture, kept, removed, numbers = fig.data
    assert picture.type == "image" and picture.source.startswith("data:image/png;base64,")
    assert list(kept.x) == [0, 10, 20] and list(kept.y) == [0, 10, 20]  # cell edges
    assert np.asarray(kept.z, dtype=float)[0] == pytest.approx([0.8, 0.6])  # √α
    assert np.isnan(np.asarray(kept.z, dtype=float)[1]).all()
    assert (kept.zmin, kept.zmax) == (0, 1)  # fixed, not stretched per image
    assert list(kept.colorbar.ticktext) == [f"{t:g}" for t in pictures.WEIGHT_TICKS]
    assert kept.colorbar.tickvals[3] == pytest.approx(math.sqrt(0.1))
    grey = np.asarray(removed.z, dtype=float)
    assert np.isnan(grey[0]).all() and (grey[1] == 1).all()
    assert removed.colorscale[0][1] == REMOVED_COLOUR
    assert list(numbers.text) == ["0", "1", "2", "3"]
    assert list(numbers.x) == [5, 15, 5, 15] and list(numbers.y) == [5, 5, 15, 15]
    assert [s.line.color for s in fig.layout.shapes] == ["rgb(255,64,64)", "rgb(64,200,255)"]
    assert fig.layout.yaxis.range == (20, 0)  # image orientation: row 0 at the top


def test_sorted_scores_put_the_largest_first_and_draw_the_cut():
    fig = sorted_scores_figure([0.1, 0.6, 0.0, 0.3], [False, True, False, True], 0.125,
                               "â_m", "θ = ξ/M")
    bars = fig.data[0]
    assert list(bars.x) == ["1", "3", "0", "2"]
    assert list(bars.customdata) == pytest.approx([0.6, 0.3, 0.1, 0.0])
    assert bars.y[-1] == pytest.approx(0.05)  # a zero score drawn at half the smallest (log)
    assert bars.marker.color[2] == REMOVED_COLOUR and bars.marker.color[0] != REMOVED_COLOUR
    lines = sorted(s.y0 for s in fig.layout.shapes)
    assert lines == pytest.approx([0.125, 0.25])  # the cut and 1/M
    assert any("2 kept" in a.text for a in fig.layout.annotations)
    assert fig.layout.annotations[1].y == pytest.approx(math.log10(0.125))  # log units
    at_zero = sorted_scores_figure([0.5, 0.5], [True, True], 0.0, "â_m", "θ = ξ/M")
    assert any("θ = ξ/M = 0: every patch is kept" in a.text for a in at_zero.layout.annotations)
    mean_pooling = sorted_scores_figure([0.5, 0.5], [True, True], None, "α_m", "1/M")
    assert [a.text for a in mean_pooling.layout.annotations][-1] == (
        "no threshold: every patch is kept")


def test_the_ablation_pair_differs_only_in_the_patch_loss():
    base = config_to_dict(RunConfig(name="a", model={"backbone": "small_cnn"}))
    without = {**base, "name": "b", "tags": ["x"], "loss": {**base["loss"], "gamma_max": 0.0,
                                                           "ramp_epochs": 3}}
    assert patch_loss_partner(base, without) and patch_loss_partner(without, base)
    assert not patch_loss_partner(base, base)  # both with the patch loss
    other_seed = {**without, "train": {**base["train"], "seed": 1}}
    assert not patch_loss_partner(base, other_seed)
    # an older run config (fields added since are missing) still pairs
    old = {k: v for k, v in base.items()}
    old["loss"] = {k: v for k, v in base["loss"].items() if k != "ramp_by"}
    assert patch_loss_partner(old, without)


def test_energy_rank_is_the_share_of_test_images_more_familiar():
    from engine.explore import energy_rank, free_energy

    # one class logit each: E = -log(e^z + (K-1)) with the other K-1 logits 0
    reference = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [8.0, 0.0]])
    assert free_energy(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(-math.log(2))
    assert energy_rank(reference, torch.tensor([2.0, 0.0])) == 0.5  # below 3 and 8 only
    assert energy_rank(reference, torch.tensor([-5.0, -5.0])) == 1.0
    assert energy_rank(reference, torch.tensor([20.0, 0.0])) == 0.0


def test_samples_are_fixed_pngs_that_go_the_upload_path():
    import io

    from PIL import Image

    from engine.inputs import image_from_bytes
    from engine.samples import SAMPLES, sample_png

    for name in SAMPLES:
        png = sample_png(name)
        assert png == sample_png(name)  # deterministic: the same picture every time
        assert Image.open(io.BytesIO(png)).size == (96, 96)
        assert image_from_bytes(png, (32, 32), name, "squash").shape == (3, 32, 32)
    with pytest.raises(ValueError, match="sample must be one of"):
        sample_png("a cat")


def test_explorer_samples_show_the_input_and_warn_when_unlike_the_training_data(tmp_path,
                                                                                monkeypatch):
    from conftest import errors, open_page

    monkeypatch.setenv("LOSSATTN_RUNS", str(tmp_path / "runs"))
    at = open_page("explorer")
    at.radio(key="w_ex_source").set_value("samples").run()
    at.selectbox(key="w_ex_sample").set_value("a typed 7").run()
    assert not at.exception and not errors(at)
    assert at.metric[0].value == "7" and not at.warning  # a clean typed digit: no warning
    assert any("True: 7 (a drawn sample)" in c.value for c in at.caption)
    # beside the slider: the file as given and the exact model input
    assert len(at.get("image")) == 2
    at.selectbox(key="w_ex_sample").set_value("no digit: noise").run()
    warnings = " ".join(w.value for w in at.warning)
    assert "Unlike the training data" in warnings and "Low confidence" in warnings


def test_cams_read_only_the_feature_cells_the_head_reads():
    """small_cnn at 32x32: a 16x16 feature map, 6x6 patches of 5x5 cells at stride 2, so row
    and column 15 feed no patch; the CAMs drew a bright band there (bottom and right)."""
    from pathlib import Path

    from engine.checkpoint import load_model
    from engine.data.digits import generate
    from engine.explain import compare_maps, read_by_patches

    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_small_cnn_la.pt"
    model, _ = load_model(shipped)
    read = read_by_patches(model.eval(), (16, 16))
    assert read[:15, :15].all() and not read[15].any() and not read[:, 15].any()
    data = generate("test", 32, 32, False, 0)
    maps = compare_maps(model, data, torch.arange(32), "true", ["gradcam++"], 0.1)["maps"]
    band = maps["gradcam++"][:, -2:, :].mean()  # pixels 30-31: outside every patch's box
    assert band < 0.5 * maps["gradcam++"].mean()
    assert read_by_patches(build_model(ModelConfig(backbone="small_cnn", head="plain")),
                           (16, 16)) is None


def test_sanity_cascade_randomises_top_down_and_leaves_the_model_alone():
    from pathlib import Path

    from engine.checkpoint import load_model
    from engine.data.digits import generate
    from engine.sanity import cascade_maps, cascade_units, randomised_copy, spearman

    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_small_cnn_la.pt"
    model, _ = load_model(shipped)
    model.eval()
    units = cascade_units(model)
    assert [label for label, _ in units][:2] == ["classifier", "patch layer"]
    assert units[0][1] == [model.head.fc] and units[-1][0].startswith("backbone 1-")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = randomised_copy(model, 1)
    assert not torch.equal(one.head.fc.weight, model.head.fc.weight)
    assert torch.equal(one.head.patches.conv5.weight, model.head.patches.conv5.weight)
    assert torch.equal(randomised_copy(model, 1).head.fc.weight, one.head.fc.weight)  # seeded
    data = generate("test", 8, 32, False, 0)
    out = cascade_maps(model, data, [0, 1], "true", ["loss_attention", "gradcam"], 0.1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert out["steps"][0] == "trained" and len(out["steps"]) == len(units) + 1
    assert out["maps"]["loss_attention"].shape == (len(units) + 1, 2, 32, 32)
    assert np.allclose(out["rho"]["loss_attention"][0], 1.0)  # the trained map vs itself
    assert out["rho"]["loss_attention"][-1].mean() < 0.9  # a random model explains otherwise
    assert spearman(np.arange(9.0), np.arange(9.0) ** 3) == pytest.approx(1.0)
    assert math.isnan(spearman(np.ones(4), np.arange(4.0)))
    with pytest.raises(ValueError, match="one-pass methods"):
        cascade_maps(model, data, [0], "true", ["scorecam"])


def test_eta_is_measured_not_promised():
    from ui.st_forms import eta_text

    assert eta_text(None, 0.5, 100.0).endswith("measured once a first part is done")
    assert "measured once" in eta_text(90.0, 0.01, 100.0)
    # a quarter done in 60 s: three quarters left, 180 s
    assert eta_text(40.0, 0.25, 100.0) == "; about 3:00 left (1:00 so far)"
