"""γmax as a knob (issue 29): families of models that differ only in γmax, sweeps over seeds,
the shipped family and its results, half-precision checkpoints."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import gamma_family as family
from engine.checkpoint import load_checkpoint, load_model, peer_state
from engine.config import RunConfig, config_to_dict
from engine.errors import ConfigError
from engine.explore import flat_config, gamma_families, varied_fields_beyond_gamma
from engine.sweep import format_sweep, seed_groups, with_seeds
from ui.figures import gamma_effects

ROOT = Path(__file__).resolve().parents[1]


def config(gamma=0.1, **changes) -> dict:
    data = config_to_dict(RunConfig())
    data["loss"]["gamma_max"] = gamma
    for path, value in changes.items():
        section, key = path.split("__")
        data[section][key] = value
    return data


# ----------------------------------------------------------------------------------------------
# Families


def test_models_that_differ_only_in_gamma_form_one_family():
    configs = {"a": config(0.1), "b": config(0.3), "c": config(0.0, loss__ramp_epochs=7),
               "d": config(0.3, train__threads=1, train__device="cpu"),  # how it ran: same
               "other": config(0.3, model__backbone="vgg11_bn"),
               "alone": config(1.0, train__seed=5)}
    families = gamma_families(configs)
    # γmax 0 has no patch loss, so its ramp does not matter; a repeated γmax keeps the first
    assert families == [{0.0: "c", 0.1: "a", 0.3: "b"}]
    assert list(families[0]) == sorted(families[0])


def test_a_gamma_zero_model_joins_each_family_it_matches():
    configs = {"z": config(0.0), "a1": config(0.1, loss__ramp_epochs=3),
               "a2": config(0.3, loss__ramp_epochs=3), "b1": config(0.1, loss__ramp_epochs=9)}
    families = sorted(gamma_families(configs), key=len)
    assert families == [{0.0: "z", 0.1: "b1"}, {0.0: "z", 0.1: "a1", 0.3: "a2"}]


def test_the_fields_beyond_gamma_are_named():
    configs = [config(0.1), config(0.3, model__head="mean", model__xi=0.5)]
    assert varied_fields_beyond_gamma(configs) == ["model.head", "model.xi"]
    assert flat_config(configs[0])["loss.gamma_max"] == "0.1"


def test_a_sweep_that_varies_more_than_gamma_is_refused_naming_the_fields():
    from ui.st_gamma import _sweep_source

    cells = {f"run: s-{i}": config(g, model__xi=x) for i, (g, x) in
             enumerate([(0.0, 0.0), (0.1, 0.0), (0.0, 0.5), (0.1, 0.5)])}
    refused = _sweep_source("s", cells, current="shipped: something else")
    assert not refused.stops and "model.xi" in refused.problem
    assert "more than γmax" in refused.problem
    beside = _sweep_source("s", cells, current="run: s-2")  # a cell: the cells beside it
    assert beside.stops == {0.0: "run: s-2", 0.1: "run: s-3"}
    assert "model.xi = 0.5" in beside.note
    heads = {"run: h-0": config(0.1), "run: h-1": config(0.1, model__head="mean")}
    assert "no two finished cells differ only in γmax" in _sweep_source("h", heads, None).problem


# ----------------------------------------------------------------------------------------------
# Seeds


@pytest.mark.parametrize("seeds", [0, -1, 21, "3", True])
def test_seeds_out_of_range_are_refused_naming_the_flag(seeds):
    with pytest.raises(ConfigError, match="--seeds"):
        with_seeds([("loss.gamma_max", [0, 0.1])], seeds)


def test_seeds_add_a_seed_axis_once():
    grid = [("loss.gamma_max", [0, 0.1])]
    assert with_seeds(grid, 1) == grid
    assert with_seeds(grid, 3, first=5) == [*grid, ("train.seed", [5, 6, 7])]
    with pytest.raises(ConfigError, match="both give the seeds"):
        with_seeds([("train.seed", [0, 1])], 2)


@pytest.mark.parametrize("value", ["0", "21", "x"])
def test_the_sweep_cli_refuses_bad_seeds(tmp_path, value):
    out = subprocess.run([sys.executable, "-m", "engine", "sweep", "--seeds", value,
                          "--runs-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, check=False)
    assert out.returncode == 2 and "--seeds" in out.stderr and "Traceback" not in out.stderr


def test_seed_groups_give_mean_and_sample_sd_and_leave_gaps():
    rows = [{"loss.gamma_max": 0.1, "train.seed": s, "run": f"r{s}", "state": "finished",
             "accuracy": a} for s, a in enumerate([0.8, 0.9, 1.0])]
    rows += [{"loss.gamma_max": 0.3, "train.seed": 0, "run": "f0", "state": "failed"},
             {"loss.gamma_max": 0.3, "train.seed": 1, "run": "f1", "state": "finished",
              "accuracy": 0.5},
             {"loss.gamma_max": 0.3, "train.seed": 2, "run": "f2", "state": "running",
              "accuracy": 0.99}]  # not finished: its value is not the cell's
    report = {"sweep": "s", "fields": ["loss.gamma_max", "train.seed"], "rows": rows}
    first, second = seed_groups(report)
    assert first["accuracy"] == pytest.approx(0.9) and first["accuracy_sd"] == pytest.approx(0.1)
    assert first["n"] == 3 and first["states"] == {"finished": 3}
    assert second["accuracy"] == 0.5 and second["accuracy_sd"] is None
    assert second["states"] == {"failed": 1, "finished": 1, "running": 1}
    text = format_sweep(report)
    assert "0.9000 ± 0.1000" in text and "3/3 finished" in text and "1/3 finished" in text


# ----------------------------------------------------------------------------------------------
# Half precision


def test_a_half_precision_checkpoint_decodes_exactly(tmp_path):
    """``export --half``: every floating tensor stored as float16, and the loaded model holds
    exactly those values (in float32), so what a card measures is what any load computes."""
    from engine import launch
    from engine.config import DataConfig, LossConfig, ModelConfig, TrainConfig
    from engine.export import export_model
    from engine.runs import RunStore

    store = RunStore(tmp_path)
    run = launch.launch(store, RunConfig(
        name="h", model=ModelConfig(backbone="small_cnn"), data=DataConfig(train_size=64,
                                                                           test_size=32),
        train=TrainConfig(epochs=1, batch_size=32), loss=LossConfig(ramp_epochs=0)))
    assert launch.wait(run, timeout=600).state == "finished"
    run.update_status(command="python -m engine train --name h")  # what the CLI records
    out, card = export_model(run, tmp_path / "h-half.pt", half=True)
    # headed by the file's name, which the app's model picker shows, not the run's ("h")
    assert card.read_text().startswith("# h-half\n")
    stored = load_checkpoint(out)
    assert stored["stored_dtype"] == "float16"
    assert {v.dtype for v in peer_state(stored).values() if v.is_floating_point()} == {
        torch.float16}
    model, _ = load_model(out)
    trained = peer_state(load_checkpoint(run.best_checkpoint))
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32
            assert torch.equal(value, trained[key].half().float()), key
    assert "half precision" in card.read_text() and "--half" in card.read_text()
    # a patch loss with no ramp-up (the live preset's): the card says so in words
    assert "at full weight from the first step (no ramp-up)" in card.read_text()
    assert "ramped over 0 epochs" not in card.read_text()


# ----------------------------------------------------------------------------------------------
# The shipped family


MEMBERS = [family.CHECKPOINTS / family.checkpoint_name(g) for g in family.GAMMAS]


def test_the_shipped_family_is_small_half_precision_and_one_experiment_but_gamma():
    assert sum(p.stat().st_size for p in MEMBERS) <= 8_000_000
    configs = {}
    for path, gamma in zip(MEMBERS, family.GAMMAS, strict=True):
        ckpt = load_checkpoint(path)
        assert ckpt["stored_dtype"] == "float16"
        assert ckpt["run_config"]["loss"]["gamma_max"] == gamma
        assert ckpt["run_config"]["preset"] == "live" and ckpt["run_config"]["train"]["seed"] == 0
        card = path.with_suffix(".md").read_text()
        assert "python -m engine train" in card and "--threads 1" in card
        assert "python -m engine gamma-family" in card
        configs[path.stem] = ckpt["run_config"]
    assert gamma_families(configs) == [dict(zip(family.GAMMAS, configs, strict=True))]


def test_the_results_cover_every_gamma_seed_and_xi_and_match_the_shipped_weights():
    results = family.load_results()
    rows = results["rows"]
    assert len(rows) == len(family.GAMMAS) * 3 * len(family.XI_GRID)
    assert {r["images"] for r in rows} == {3000}
    entries = family.at_xi(results, 0.1)
    assert [e["gamma_max"] for e in entries] == list(family.GAMMAS)
    assert all(e["seeds"] == 3 for e in entries)
    # seed 0's row is the shipped checkpoint, evaluated as shipped (two members, for time)
    from engine.config import DataConfig, config_from_dict
    from engine.data import load_split
    from engine.evaluate import evaluate_model, summary_rows

    for gamma in (0.0, 1.0):
        model, ckpt = load_model(family.CHECKPOINTS / family.checkpoint_name(gamma))
        data = load_split(config_from_dict(DataConfig, ckpt["run_config"]["data"]), "test")
        row = summary_rows(evaluate_model(model, data, torch.device("cpu"),
                                          groups=["image", "patch", "localization"],
                                          pr_curves=False))[0]
        shipped = next(r for r in rows if r["gamma_max"] == gamma and r["seed"] == 0
                       and r["xi"] == 0.1)
        for key in ("accuracy", "f_paper", "gt_known_loc", "patches_per_image"):
            assert round(row[key], 6) == shipped[key], (gamma, key)


def test_what_gamma_does_reads_the_results_in_words():
    entries = [{"gamma_max": g, "accuracy": m, "accuracy_min": m - d, "accuracy_max": m + d,
                "accuracy_values": [m - d, m, m + d]}
               for g, m, d in [(0.0, 0.5, 0.01), (0.1, 0.52, 0.02), (1.0, 0.8, 0.01)]]
    steps = family.spread_verdicts(entries, "accuracy")
    assert steps == [(0.0, 0.1, False), (0.1, 1.0, True)]
    [line] = family.effect_sentences(entries)
    assert "beyond the seeds' spread: 0.1→1 (+0.280)" in line and "within it: 0→0.1" in line
    fig = gamma_effects(entries, current=0.1)
    accuracy = fig.data[0]
    assert list(accuracy.x) == ["0", "0.1", "1"]
    assert list(accuracy.error_y.array) == pytest.approx([0.01, 0.02, 0.01])
    assert len(set(accuracy.marker.color)) == 2  # this model's γmax stands out
    assert tuple(fig.layout.yaxis.range) == (0, 1.02)  # a rate on its natural range


def test_the_family_command_builds_results_and_half_checkpoints(tmp_path, monkeypatch):
    """``python -m engine gamma-family``'s path on a small version of the recipe (96 images):
    the results file, the exported half-precision members with cards, and training that
    repeats bit for bit (threads pinned)."""
    from engine.runs import RunStore

    monkeypatch.setattr(family, "BASE", {**family.BASE, "data": {
        "dataset": "digits", "train_size": 96, "test_size": 64}})
    monkeypatch.setattr(family, "XI_GRID", (0.0, 0.1, 1.0))
    out = family.build_family(RunStore(tmp_path / "runs"), tmp_path / "ck", tmp_path / "res",
                              seeds=2, gammas=(0.0, 0.3), log=lambda m: None)
    assert len(out["rows"]) == 2 * 2 * 3
    saved = family.load_results(tmp_path / "res")
    assert saved["rows"] == out["rows"] and saved["gammas"] == [0.0, 0.3]
    assert "0.3" in (tmp_path / "res" / "results.md").read_text()
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.pt")) == [
        "digits_live_gamma0.3.pt", "digits_live_gamma0.pt"]
    again = family.build_family(RunStore(tmp_path / "again"), tmp_path / "ck2",
                                tmp_path / "res2", seeds=2, gammas=(0.0, 0.3), parallel=1,
                                log=lambda m: None)
    assert again["rows"] == out["rows"]
    for name in ("digits_live_gamma0.pt", "digits_live_gamma0.3.pt"):
        a, b = load_checkpoint(tmp_path / "ck" / name), load_checkpoint(tmp_path / "ck2" / name)
        assert all(torch.equal(peer_state(a)[k], peer_state(b)[k]) for k in peer_state(a))
