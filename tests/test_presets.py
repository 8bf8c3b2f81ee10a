"""Named presets: exactly their fields, what the user gives wins, recorded in config.json,
idempotent, per sweep cell; and the released conv head's threshold θ = ξ/(H·W) by hand."""

import json

import pytest
import torch
from conftest import errors, open_page

from engine import launch as background
from engine.cli import build_parser, main
from engine.cli.runs import build_run_config
from engine.config import ConfigError, RunConfig, config_from_dict, config_to_dict
from engine.models import build_model, head_spec
from engine.preset_fill import fill_preset
from engine.presets import PRESETS, preset_names
from engine.runs import RunStore
from engine.sweep import config_value, sweep_configs, varied_fields
from engine.train import prepare_run_config, train_run

SCHEDULE = {"model": {"xi": 0.1}, "loss": {"gamma_max": 0.1, "ramp_epochs": 80},
            "train": {"epochs": 200, "batch_size": 128}}
SGD = {"momentum": 0.9, "weight_decay": 5e-4, "milestones": [0.5, 0.75]}
FP32 = {"amp": False}  # released-code: the scripts train in fp32, not under bf16 autocast


def _expected(model: dict, train: dict) -> dict:
    return {"model": {**SCHEDULE["model"], **model}, "loss": SCHEDULE["loss"],
            "train": {**SCHEDULE["train"], **train}}


@pytest.mark.parametrize("preset, head, dataset, expected", [
    ("paper", "loss_attention", "digits",
     _expected({"xi_denominator": "patches", "stem_norm": True}, {"lr": 0.1, **SGD})),
    ("paper", "capsule_loss_attention", "coco",
     _expected({"xi_denominator": "patches", "stem_norm": True}, {"lr": 0.1, **SGD})),
    ("released-code", "loss_attention", "digits",
     _expected({"xi_denominator": "feature_map", "stem_norm": False}, {"lr": 0.1, **SGD, **FP32})),
    ("released-code", "loss_attention", "coco",
     _expected({"xi_denominator": "feature_map", "stem_norm": False}, {"lr": 0.05, **SGD, **FP32})),
    ("released-code", "capsule_loss_attention", "cifar10",
     _expected({"xi_denominator": "patches", "stem_norm": False}, {"lr": 0.1, **SGD, **FP32})),
    ("released-code", "capsule_loss_attention", "coco",
     _expected({"xi_denominator": "patches", "stem_norm": False}, {"lr": 0.05, **SGD, **FP32})),
    # Mean-pooling trains with the paper's Adam recipe: no SGD fields, and no released code
    # thresholds it, so the denominator is left alone.
    ("released-code", "mean", "coco", _expected({"stem_norm": False}, FP32)),
])
def test_a_preset_yields_exactly_its_fields(preset, head, dataset, expected):
    given = {"preset": preset, "model": {"head": head}, "data": {"dataset": dataset}}
    filled = fill_preset(given)
    assert filled["preset"] == preset and filled["data"] == {"dataset": dataset}
    model = dict(filled["model"])
    assert model.pop("head") == head
    assert {"model": model, "loss": filled["loss"], "train": filled["train"]} == expected
    assert given == {"preset": preset, "model": {"head": head}, "data": {"dataset": dataset}}
    config_from_dict(RunConfig, filled)  # and the fields validate


def test_the_denominator_comes_from_the_head_spec():
    assert head_spec("loss_attention").released_xi_denominator == "feature_map"
    assert head_spec("capsule_loss_attention").released_xi_denominator == "patches"
    assert head_spec("attention").released_xi_denominator is None


def _train_args(*argv: str):
    return build_parser().parse_args(["train", *argv])


def test_what_the_user_gives_wins_over_the_preset(tmp_path):
    cfg = build_run_config(_train_args("--preset", "released-code", "--set", "model.xi=0.5",
                                       "--lr", "0.2", "--epochs", "3"))
    assert (cfg.model.xi, cfg.train.lr, cfg.train.epochs) == (0.5, 0.2, 3)
    assert (cfg.model.xi_denominator, cfg.model.stem_norm, cfg.loss.ramp_epochs) == (
        "feature_map", False, 80)
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"preset": "released-code",
                                "model": {"xi_denominator": "patches"}}))
    from_file = build_run_config(_train_args("--config", str(file)))
    assert (from_file.preset, from_file.model.xi_denominator, from_file.model.stem_norm) == (
        "released-code", "patches", False)
    # --preset names the preset over the file's; the file's fields still win over both.
    flag = build_run_config(_train_args("--config", str(file), "--preset", "paper"))
    assert (flag.preset, flag.model.xi_denominator, flag.model.stem_norm) == (
        "paper", "patches", True)
    # No preset named: the data set's own (the digits: live); "preset": null asks for none.
    plain = build_run_config(_train_args())
    assert plain.preset == "live" and plain.train.epochs == 2 and plain.train.recipe == "onecycle"
    cifar = build_run_config(_train_args("--dataset", "cifar10"))
    assert cifar.preset is None and cifar.train.epochs == 200 and cifar.train.lr is None
    file.write_text(json.dumps({"preset": None}))
    bare = build_run_config(_train_args("--config", str(file)))
    assert bare.preset is None and bare.train.epochs == 200 and bare.train.recipe == "auto"


def test_the_preset_is_recorded_in_config_json_and_shows_in_diffs(tmp_path):
    store = RunStore(tmp_path)
    for name, preset in (("with-preset", "released-code"), ("default", None)):
        cfg = build_run_config(_train_args("--backbone", "small_cnn", "--epochs", "2",
                                           "--name", name, *(["--preset", preset] if preset
                                                             else [])))
        store.create(prepare_run_config(cfg))
    saved = json.loads((tmp_path / "with-preset" / "config.json").read_text())
    assert saved["preset"] == "released-code"
    assert saved["model"]["xi_denominator"] == "feature_map" and saved["train"]["lr"] == 0.1
    runs = [store.get("with-preset"), store.get("default")]
    fields = varied_fields(runs)
    assert fields[0] == "preset" and "model.stem_norm" in fields
    assert [config_value(r.config_dict(), "preset") for r in runs] == ["released-code", "live"]


def test_an_unknown_preset_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError,
                       match=r"preset must be one of \['paper', 'released-code', 'live'\]"):
        RunConfig(preset="papr")
    with pytest.raises(ConfigError, match="preset must be one of"):
        fill_preset({"preset": "papr"})
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"preset": "papr"}))
    assert main(["train", "--runs-dir", str(tmp_path), "--config", str(file)]) == 2
    assert "preset must be one of ['paper', 'released-code', 'live']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses it with the choices
        _train_args("--preset", "papr")
    assert "invalid choice: 'papr'" in capsys.readouterr().err


def test_applying_a_preset_to_a_resolved_config_changes_nothing():
    for preset in preset_names():
        once = fill_preset({"preset": preset, "model": {"backbone": "small_cnn"},
                            "train": {"epochs": 2}})
        assert fill_preset(once) == once
        resolved = config_to_dict(prepare_run_config(config_from_dict(RunConfig, once)))
        assert fill_preset(resolved) == resolved  # resume and reuse read this back unchanged
        assert config_to_dict(config_from_dict(RunConfig, fill_preset(resolved))) == resolved
    assert fill_preset({"preset": None, "model": {}}) == {"preset": None, "model": {}}


def test_transfer_peers_get_their_own_heads_denominator():
    filled = fill_preset({"preset": "released-code", "model": {"head": "loss_attention"},
                          "transfer": {"peers": [{"head": "capsule_loss_attention"},
                                                 {"head": "capsule_loss_attention",
                                                  "xi_denominator": "feature_map"}]}})
    peers = filled["transfer"]["peers"]
    assert filled["model"]["xi_denominator"] == "feature_map"
    assert [p["xi_denominator"] for p in peers] == ["patches", "feature_map"]
    assert all(p["stem_norm"] is False for p in peers)


def test_a_sweep_over_the_head_gets_each_heads_preset_fields():
    grid = [("model.head", ["loss_attention", "capsule_loss_attention"])]
    given = {"preset": "released-code", "model": {"backbone": "small_cnn"}}
    cells = sweep_configs(given, grid, "heads")
    assert [c.model.xi_denominator for c in cells] == ["feature_map", "patches"]
    assert all(c.preset == "released-code" and not c.model.stem_norm for c in cells)
    explicit = {**given, "model": {"backbone": "small_cnn", "xi_denominator": "patches"}}
    assert [c.model.xi_denominator for c in sweep_configs(explicit, grid, "heads")] == [
        "patches", "patches"]
    data_grid = [("data.dataset", ["digits", "coco"])]
    assert [c.train.lr for c in sweep_configs(given, data_grid, "data")] == [0.1, 0.05]
    # A grid value is given by the user, so it wins over the preset.
    assert [c.model.xi for c in sweep_configs(given, [("model.xi", [0.0, 1.0])], "xi")] == [
        0.0, 1.0]


def test_a_resolved_sweep_base_with_a_preset_refuses_a_head_grid():
    base = config_from_dict(RunConfig, fill_preset({"preset": "released-code"}))
    with pytest.raises(ConfigError, match="sweep over model.head with preset 'released-code'"):
        sweep_configs(base, [("model.head", ["loss_attention", "mean"])], "s")
    cells = sweep_configs(base, [("model.xi", [0.0, 0.1])], "s")  # a field it does not read
    assert [c.model.xi_denominator for c in cells] == ["feature_map", "feature_map"]


def test_presets_are_listed(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in PRESETS)
    with pytest.raises(SystemExit):
        _train_args("--help")
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal
    assert "--preset {paper,released-code,live,none}" in help_text
    assert "no stem BN/ReLU" in help_text


def test_preset_none_asks_for_no_preset_not_even_the_data_sets():
    """The shipped models' cards reproduce with ``--preset none``: the RunConfig defaults, not
    the digits' live schedule (which would silently change 30 epochs of SGD into one-cycle)."""
    cfg = build_run_config(_train_args("--backbone", "small_cnn", "--epochs", "30",
                                       "--preset", "none"))
    assert cfg.preset is None
    assert (cfg.train.epochs, cfg.train.batch_size) == (30, 128)
    assert prepare_run_config(cfg).train.recipe == "sgd"  # the head's own recipe
    assert (cfg.loss.gamma_max, cfg.loss.ramp_by, cfg.data.augment) == (0.1, "epoch", True)
    assert cfg.data.train_size is None and cfg.train.eval_sample is None


# ----------------------------------------------------------------------------------------------
# Known answer: the released conv head thresholds at θ = ξ/(H·W) of the map before the patch conv


def _released_model(head: str = "loss_attention", **model):
    cfg = config_from_dict(RunConfig, fill_preset(
        {"preset": "released-code", "model": {"backbone": "small_cnn", "head": head, **model}}))
    return build_model(cfg.model).eval()


def _hand_weights(norms: list[float], theta: float) -> list[float]:
    """â_m = n_m / Σ n, t_m = max(â_m - θ, 0), α = t / Σ t, in plain Python."""
    a = [n / sum(norms) for n in norms]
    t = [max(v - theta, 0.0) for v in a]
    return [v / sum(t) for v in t]


def test_released_conv_head_thresholds_at_xi_over_the_feature_map_cells():
    model = _released_model()
    assert model.config.xi_denominator == "feature_map" and model.config.xi == 0.1
    with torch.no_grad():
        rows, cols = model.backbone(torch.zeros(1, 3, 32, 32)).shape[-2:]  # before the patch conv
        grid = model.grid((32, 32))
        m, channels = grid.num_patches, model.head.fc.in_features
        # One channel carries c_m and the classifier reads only it: patch logit norm = c_m.
        model.head.fc.weight.zero_()
        model.head.fc.weight[0, 0] = 1.0
        model.head.fc.bias.zero_()
        norms = [1.0] * m
        norms[5], norms[7] = 0.05, 0.0  # â_5 = 0.05/34.05 ≈ 1.47e-3, between the two θ
        tokens = torch.zeros(1, m, channels)
        tokens[0, :, 0] = torch.tensor(norms)
        alpha = model.decode(tokens, grid).patch_weights[0]
    theta = 0.1 / (rows * cols)  # 0.1/256 for small_cnn's 16x16 map
    assert (rows * cols, m) == (256, 36)
    torch.testing.assert_close(alpha, torch.tensor(_hand_weights(norms, theta)),
                               rtol=0, atol=1e-7)
    assert (alpha == 0).nonzero().flatten().tolist() == [7]  # patch 5 survives ξ/(H·W)
    # The paper's ξ/M = 0.1/36 ≈ 2.8e-3 drops patch 5 as well: a different patch set.
    paper = _released_model(xi_denominator="patches")
    paper.load_state_dict(model.state_dict())
    with torch.no_grad():
        by_patches = paper.decode(tokens, grid).patch_weights[0]
    torch.testing.assert_close(by_patches, torch.tensor(_hand_weights(norms, 0.1 / m)),
                               rtol=0, atol=1e-7)
    assert (by_patches == 0).nonzero().flatten().tolist() == [5, 7]


def test_released_conv_forward_on_an_image_uses_the_same_threshold():
    model = _released_model()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    a = out.patch_logits.norm(dim=-1)
    a = a / a.sum(1, keepdim=True)
    t = (a - 0.1 / 256).clamp_min(0)
    torch.testing.assert_close(out.patch_weights, t / t.sum(1, keepdim=True))
    assert _released_model("capsule_loss_attention").theta(out.grid) == pytest.approx(0.1 / 36)


def test_train_page_launches_with_a_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSATTN_RUNS", str(tmp_path))
    at = open_page("train", tr_train_size=64, tr_test_size=32, tr_epochs=1, tr_batch=32)
    assert at.selectbox(key="w_tr_preset").options[1:] == [
        f"{name}: {p.description}" for name, p in PRESETS.items()]
    at.selectbox(key="w_tr_preset").set_value("released-code").run()
    # The form now shows the preset's values, and names what it sets beyond the form.
    assert [at.number_input(key=f"w_tr_{k}").value for k in ("xi", "gamma", "epochs", "batch")
            ] == [0.1, 0.1, 200, 128]
    caption = " ".join(c.value for c in at.caption)
    assert "model.xi_denominator = feature_map" in caption and "model.stem_norm = False" in caption
    at.number_input(key="w_tr_epochs").set_value(1).run()
    at.number_input(key="w_tr_batch").set_value(32).run()
    at.text_input(key="w_tr_name").set_value("preset-run").run()
    at.button(key="tr_launch").click().run()
    assert not at.exception and not errors(at)
    run = RunStore(tmp_path).get("preset-run")
    cfg = run.config()
    assert cfg.preset == "released-code" and not cfg.model.stem_norm
    assert cfg.model.xi_denominator == "feature_map" and cfg.loss.ramp_epochs == 80
    assert (cfg.train.epochs, cfg.train.batch_size) == (1, 32)  # what the user typed wins
    assert background.wait(run, timeout=120).state == "finished"


def test_the_digits_default_is_the_live_preset_and_its_run_uses_it(tmp_path):
    """A run that names no preset gets its data set's (digits: live); the run then trains
    with it: one-cycle lr per step, the patch-loss ramp by step, a sampled mid-run
    evaluation. What the user gives still wins."""
    cfg = build_run_config(_train_args("--backbone", "small_cnn", "--train-size", "96",
                                       "--test-size", "40", "--name", "live"))
    assert cfg.preset == "live"
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.recipe, cfg.train.eval_sample) == (
        2, 32, "onecycle", 500)
    assert (cfg.loss.ramp_by, cfg.loss.ramp_epochs, cfg.data.augment) == ("step", 0, False)
    assert cfg.loss.gamma_max == 0.3
    assert cfg.data.train_size == 96  # given: wins over the preset's 12,000
    run = RunStore(tmp_path).create(prepare_run_config(cfg))
    assert train_run(run, progress_bar=False) == "finished"
    rows = run.metrics()
    # The patch loss acts from the second step of epoch 0 (w = 0 only at the very first), and
    # the lr of epoch 1's first step is on the one-cycle's way down.
    assert rows[0]["train_patch_loss"] > 0 and rows[0]["patch_weight"] == 0.0
    assert rows[1]["patch_weight"] == 0.3 and rows[1]["lr"] == pytest.approx(0.2 * 0.5 / 0.8)
    assert [r["eval_images"] for r in rows] == [40, 40]  # the sample (500) exceeds the set
    # Mean-pooling trains with Adam: live shortens the run but keeps the head's recipe.
    mean = build_run_config(_train_args("--head", "mean"))
    assert mean.preset == "live" and mean.train.epochs == 2
    assert prepare_run_config(mean).train.recipe == "adam"


def test_the_train_page_opens_with_the_default_data_sets_preset():
    """First visit: the form shows the digits' live preset (what a fresh run gets) and the
    whole test set; values the session already holds are kept."""
    at = open_page("train")
    assert at.selectbox(key="w_tr_preset").value == "live" and not errors(at)
    values = {k: at.number_input(key=f"w_tr_{k}").value
              for k in ("epochs", "batch", "train_size", "test_size", "gamma")}
    assert values == {"epochs": 2, "batch": 32, "train_size": 12000, "test_size": 0,
                      "gamma": 0.3}
    kept = open_page("train", tr_epochs=1, tr_train_size=64)
    assert kept.number_input(key="w_tr_epochs").value == 1
    assert kept.number_input(key="w_tr_train_size").value == 64
    assert kept.number_input(key="w_tr_batch").value == 32


def test_choosing_the_live_preset_puts_its_backbone_in_the_form():
    """The live preset sets the backbone (small_cnn), and the Train form has a field for it:
    choosing the preset shows it there, and the caption of what the preset sets beyond the
    form does not claim a value that the form's own select would then override."""
    at = open_page("train")
    at.selectbox(key="w_tr_backbone").set_value("resnet18").run()
    at.selectbox(key="w_tr_preset").set_value("paper").run()
    assert at.selectbox(key="w_tr_backbone").value == "resnet18"  # paper keeps the default
    at.selectbox(key="w_tr_preset").set_value("live").run()
    assert at.selectbox(key="w_tr_backbone").value == "small_cnn" and not errors(at)
    caption = " ".join(c.value for c in at.caption)
    assert "model.backbone" not in caption and "loss.ramp_by = step" in caption
