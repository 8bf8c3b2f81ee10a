"""The Patch Explorer's teaching pieces on hand-built tensors with known answers: what ξ cuts,
Eq. 5 term by term, the patch map's colours and greyed patches, the ablation pair, the cards."""

import math
import xml.etree.ElementTree as ET

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
    KEPT_COLOUR,
    REMOVED_COLOUR,
    breakdown_latex,
    breakdown_rows,
    patch_map_svg,
    sorted_scores_svg,
    svg_width,
)
from ui.tables import markdown_table


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
    rows = breakdown_rows(b, ["a", "b", "c"], removed=1)
    # the small kept patch apart from the removed one, which shows α = 0 and adds 0
    assert [r["term"] for r in rows] == ["patch 0", "patch 1", "the other 1 patch kept, summed",
                                         "the 1 patch removed", "z = Σ α·O",
                                         "softmax(z) over all classes"]
    assert rows[2]["α_m"] == "0.1000" and rows[3]["α_m"] == "0.0000"
    assert [rows[3][f"α·O[{name}]"] for name in "abc"] == ["0.00"] * 3
    for name in "abc":
        terms = sum(float(r[f"α·O[{name}]"]) for r in rows[:4])
        assert terms == pytest.approx(float(rows[4][f"α·O[{name}]"]), abs=0.011)
    assert rows[0]["O[a]"] == "5.00" and rows[0]["α·O[a]"] == "3.00"
    assert rows[2]["O[a]"] == ""  # a sum of patches has no single logit
    latex = breakdown_latex(b, ["a", "b", "c"], removed=1)
    assert r"0.600\times5.00" in latex and r"0.300\times2.00" in latex
    assert "= 3.70" in latex and r"\mathrm{softmax}" in latex
    assert "other 1 kept" in latex and "1 removed" in latex
    assert r"\sigma" in breakdown_latex(b, ["a", "b", "c"], multilabel=True, removed=1)
    with pytest.raises(ValueError, match="removed must be in 0..2"):
        breakdown_rows(b, ["a", "b", "c"], removed=3)
    # nothing removed (ξ = 0 keeps every patch): no removed row, no removed term
    everything = breakdown_rows(b, ["a", "b", "c"], removed=0)
    assert [r["term"] for r in everything][2:4] == ["the other 2 patches kept, summed",
                                                   "z = Σ α·O"]


def test_eq5_wraps_two_terms_to_a_line_and_brackets_negative_logits():
    """Written on one line the sum ran 900 px into a 528 px column at 1366x768: it wraps."""
    alpha = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    patch_logits = torch.tensor([[[-2.0, 1.0], [4.0, 0.0], [1.0, 1.0], [3.0, -1.0]]])
    out = PatchOutput((alpha[..., None] * patch_logits).sum(1), patch_logits, alpha,
                      grid_2x2())
    b = prediction_breakdown(out, 0, False, patches=4, classes=2)
    latex = breakdown_latex(b, ["a", "b"], removed=0, terms_shown=3)
    lines = latex.split(r"\\")
    sums = [line for line in lines if r"\times" in line or "underbrace" in line]
    assert len(sums) == 2  # three products and the rest: two lines of two
    assert all(line.count(r"\times") + line.count("underbrace") <= 2 for line in sums)
    assert r"\times(-2.00)" in latex and "+ -" not in latex
    # a term that rounds to zero is 0.00, not (-0.00)
    tiny = PatchOutput(torch.tensor([[-0.001, -1.0]]), torch.tensor([[[-0.001, -1.0]] * 4]),
                       torch.tensor([[1.0, 0.0, 0.0, 0.0]]), grid_2x2())
    latex = breakdown_latex(prediction_breakdown(tiny, 0, False, patches=1, classes=2),
                            ["a", "b"], removed=3)
    assert r"1.000\times0.00" in latex and "= 0.00" in latex and "-0.00" not in latex


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


SVG = "{http://www.w3.org/2000/svg}"


def svg_tree(markup: str) -> ET.Element:
    return ET.fromstring(markup)  # well-formed XML, or this raises


def layer(root: ET.Element, name: str) -> ET.Element:
    return next(g for g in root.iter(f"{SVG}g") if g.get("class") == name)


def test_patch_map_colours_kept_patches_on_the_fixed_scale_and_greys_the_rest():
    image = np.zeros((20, 20, 3), np.uint8)
    markup = patch_map_svg(image, grid_2x2().boxes.numpy(), 2, 2, [0.64, 0.36, 0.0, 0.0],
                           [True, True, False, False], true_boxes=[(0, 0, 10, 10)],
                           selection_box=(0, 0, 20, 10), height=200, title="a <b> & c")
    root = svg_tree(markup)
    scale, top = (200 - 26) / 20, 26  # the image is drawn 174 px tall under the title band
    picture = root.find(f"{SVG}image")
    assert picture.get("href").startswith("data:image/png;base64,")
    assert float(picture.get("height")) == pytest.approx(20 * scale)
    kept = layer(root, "kept").findall(f"{SVG}rect")
    assert [r.get("data-patch") for r in kept] == ["0", "1"]
    # the fixed √α scale: α = 0.64 and 0.36 sit at 0.8 and 0.6, in the PNG download's colours
    expected = pictures.colorize(np.array([0.8, 0.6]))
    assert [r.get("fill") for r in kept] == ["rgb({},{},{})".format(*c) for c in expected]
    cells = [float(r.get(a)) for r in kept for a in ("x", "y", "width")]
    assert cells == pytest.approx([0, top, 10 * scale, 10 * scale, top, 10 * scale], abs=0.01)
    removed = layer(root, "removed").findall(f"{SVG}rect")
    assert [r.get("data-patch") for r in removed] == ["2", "3"]
    assert {r.get("fill") for r in removed} == {REMOVED_COLOUR}
    assert float(removed[0].get("y")) == pytest.approx(top + 10 * scale, abs=0.01)  # row 1
    assert [t.text for t in layer(root, "numbers")] == ["0", "1", "2", "3"]
    boxes = layer(root, "boxes").findall(f"{SVG}rect")
    assert [b.get("stroke") for b in boxes] == ["rgb(255,64,64)", "rgb(64,200,255)"]
    assert boxes[1].get("stroke-dasharray") and not boxes[0].get("stroke-dasharray")
    assert float(boxes[1].get("width")) == pytest.approx(20 * scale, abs=0.01)
    ticks = [t.text for t in layer(root, "colour-bar").iter(f"{SVG}text")][1:]
    assert ticks == [f"{t:g}" for t in pictures.WEIGHT_TICKS]
    assert root.find(f"{SVG}text").text == "a <b> & c"  # escaped in the markup, read back whole
    assert svg_width(markup) == round(20 * scale + 70)
    plain = svg_tree(patch_map_svg(image, grid_2x2().boxes.numpy(), 2, 2, [0.25] * 4,
                                   [True] * 4, focus_patch=1, colour_bar=False, height=200))
    assert not [g for g in plain.iter(f"{SVG}g") if g.get("class") == "colour-bar"]
    assert [b.get("stroke") for b in layer(plain, "boxes")] == ["rgb(255,255,255)"]


def test_sorted_scores_put_the_largest_first_and_draw_the_cut():
    root = svg_tree(sorted_scores_svg([0.1, 0.6, 0.0, 0.3], [False, True, False, True], 0.125,
                                      "â_m", "θ = ξ/M"))
    bars = layer(root, "bars").findall(f"{SVG}rect")
    assert [b.get("data-patch") for b in bars] == ["1", "3", "0", "2"]
    assert [float(b.get("data-score")) for b in bars] == pytest.approx([0.6, 0.3, 0.1, 0.0])
    assert [b.get("fill") for b in bars][1:3] == [KEPT_COLOUR, REMOVED_COLOUR]
    # a log axis: each decade is the same height, and a zero score is drawn at half the
    # smallest (0.05), so its bar is log10(0.1 / 0.05) of a decade shorter than 0.1's
    tops = [float(b.get("y")) for b in bars]
    ticks = {t.text: float(t.get("y")) for t in layer(root, "y-ticks")}
    decade = ticks["0.1"] - ticks["1"]
    assert tops[0] - ticks["1"] == pytest.approx(decade * -math.log10(0.6), abs=0.01)
    assert tops[3] - tops[2] == pytest.approx(decade * math.log10(2), abs=0.01)
    lines = layer(root, "lines")
    heights = sorted(float(line.get("y1")) for line in lines.findall(f"{SVG}line"))
    assert heights == pytest.approx(sorted([ticks["0.1"] - decade * math.log10(1.25),
                                            ticks["0.1"] - decade * math.log10(2.5)]), abs=0.01)
    assert any("2 kept" in t.text for t in lines.iter(f"{SVG}text"))
    at_zero = svg_tree(sorted_scores_svg([0.5, 0.5], [True, True], 0.0, "â_m", "θ = ξ/M"))
    assert any(t.text == "θ = ξ/M = 0: every patch is kept" for t in at_zero.iter(f"{SVG}text"))
    mean_pooling = svg_tree(sorted_scores_svg([0.5, 0.5], [True, True], None, "α_m", "1/M"))
    assert any(t.text == "no threshold: every patch is kept"
               for t in mean_pooling.iter(f"{SVG}text"))


def test_a_markdown_table_keeps_every_cell_literal_and_right_aligns_numbers():
    table = markdown_table([{"term": "patch *3*", "α_m": "0.5000", "O[a|b]": ""},
                            {"term": "z = Σ α·O", "α_m": "1.0000", "O[a|b]": "-0.25"}])
    lines = table.splitlines()
    assert lines[0] == r"| term | α\_m | O\[a\|b\] |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2] == r"| patch \*3\* | 0.5000 |  |"
    assert lines[3] == "| z = Σ α·O | 1.0000 | -0.25 |"


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
    facts = next(m.value for m in at.markdown if m.value.startswith("Prediction: "))
    assert facts.startswith("Prediction: **7**") and not at.warning  # a clean typed digit
    assert "true: 7 (a drawn sample)" in facts
    # beside the slider: the file as given and the exact model input (with the map and the
    # sorted scores, four images)
    assert len(at.get("image")) == 4
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
    from engine.sanity import cascade_maps, cascade_units, randomised_copy, spearman_rows

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
    rho = spearman_rows(np.stack([np.arange(9.0) ** 3, np.ones(9)]), np.arange(9.0))
    assert rho[0] == pytest.approx(1.0) and math.isnan(rho[1])  # a constant map: no ranking
    with pytest.raises(ValueError, match="one-pass methods"):
        cascade_maps(model, data, [0], "true", ["scorecam"])


def test_eta_is_measured_not_promised():
    from ui.st_forms import eta_text

    assert eta_text(None, 0.5, 100.0).endswith("measured once a first part is done")
    assert "measured once" in eta_text(90.0, 0.01, 100.0)
    # a quarter done in 60 s: three quarters left, 180 s
    assert eta_text(40.0, 0.25, 100.0) == "; about 3:00 left (1:00 so far)"


def test_each_shipped_model_has_one_name_in_the_picker_and_on_its_card():
    """The picker shows ``shipped: <file stem>``; the card is headed by the same name (it
    was once the run's name, digits-small-la, beside digits_small_cnn_la in the picker)."""
    from ui.st_models import SHIPPED_DIR

    cards = [c for c in sorted(SHIPPED_DIR.glob("*.md")) if c.name != "README.md"]
    assert {c.stem for c in cards} >= {"digits_small_cnn_la", "digits_small_cnn_la_gamma0"}
    for card in cards:
        assert card.with_suffix(".pt").is_file(), card.name
        heading = card.read_text().splitlines()[0]
        assert heading == f"# {card.stem}" or heading.startswith(f"# {card.stem}: "), heading
    # the pair's commands name their runs after the files they export to
    for stem in ("digits_small_cnn_la", "digits_small_cnn_la_gamma0"):
        assert f"--name {stem} " in (SHIPPED_DIR / f"{stem}.md").read_text()
