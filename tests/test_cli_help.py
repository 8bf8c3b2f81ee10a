"""The first use of the command line (issue 31): help that says what each flag does, its default
and its choices, from one source; a lazy top level; a newcomer's defaults; a warning before a
long run; a closed pipe; evaluate's progress and explain's default folder."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import cli
from engine.cli import build_parser, commands, estimate, main
from engine.cli.fieldhelp import default_text, field_docs, field_help, plain
from engine.cli.runs import TRAIN_FLAGS, build_run_config
from engine.cli.transfer import TRANSFER_FLAGS
from engine.config import DataConfig, LossConfig, ModelConfig, TrainConfig, TransferConfig

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "train": TrainConfig,
            "transfer": TransferConfig}


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal


def _subparsers(parser):
    return next(a for a in parser._actions if a.dest == "command")  # argparse keeps no handle


# ----------------------------------------------------------------------------------------------
# One source: the command table, the config docstrings, the registries


def test_every_group_registers_exactly_the_commands_the_table_gives_it():
    import argparse
    import importlib

    for group in commands.all_groups():
        probe = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"engine.cli.{group}").register(probe)
        assert set(probe.choices) == {n for n, (g, _) in commands.COMMANDS.items() if g == group}


def test_every_command_has_a_description_an_example_and_helped_flags(capsys):
    for name in commands.COMMANDS:
        parser = _subparsers(build_parser([name])).choices[name]
        assert len(parser.description) > 60, name
        assert f"python -m engine {name}" in parser.epilog, name
        for action in parser._actions:
            assert action.help, (name, action.dest)
        text = _help(capsys, name)
        assert "examples:" in text and "%(" not in text
    # one line each in the top-level help, from the table
    top = _help(capsys)
    for name, (_, line) in commands.COMMANDS.items():
        assert f"{name} {line}" in top


def test_config_flag_help_is_the_docstring_with_choices_and_defaults(capsys):
    text = _help(capsys, "train")
    # the docstring, its markup as plain text
    assert "Threshold numerator ξ in [0, 1]" in text
    assert plain(field_docs(ModelConfig)["backbone"]) in text
    # choices from the registries and the config's own constants
    assert "One of: resnet18, vgg11_bn, small_cnn, timm:<model name>." in text
    assert "One of: digits, digits_multilabel," in text
    assert "One of: auto, sgd, onecycle, adam." in text
    # the default a plain run gets, and under the other presets
    assert ("Default: small_cnn (the live preset); resnet18 with --preset paper, "
            "released-code, none. [model.backbone]") in text
    assert ("Default: 2 (the live preset); 200 with --preset paper, released-code, none. "
            "[train.epochs]") in text
    assert "Default: 0 (the live preset); 80 with --preset paper, released-code; None with " \
           "--preset none. [loss.ramp_epochs]" in text
    # transfer gets no preset unless one is named: its defaults say so
    transfer = _help(capsys, "transfer")
    assert "Default: 200; 2 with --preset live. [train.epochs]" in transfer
    assert "[transfer.lam]" in transfer and "the weight of the local-map transfer term" in transfer


def test_every_flag_that_sets_a_field_has_its_docstring():
    for section, key, _ in TRAIN_FLAGS.values():
        assert field_docs(SECTIONS[section]).get(key), f"{section}.{key}"
        assert field_help(section, key).endswith(f"[{section}.{key}]")
    for key in TRANSFER_FLAGS:
        assert field_docs(TransferConfig).get(key), f"transfer.{key}"


def test_every_mil_flag_is_its_fields_docstring(capsys):
    """``mil`` makes a flag of every MilConfig field: each field documents itself, and the
    flag's help is that docstring (no second source of help text)."""
    from engine.mil.config import MilConfig

    docs = field_docs(MilConfig)
    missing = [f.name for f in dataclasses.fields(MilConfig) if not docs.get(f.name)]
    assert missing == []
    text = _help(capsys, "mil")
    for name in ("folds", "weight_decay", "hidden"):
        assert " ".join(docs[name].split()).rstrip(".") in text, name


def test_a_field_without_a_docstring_is_named_not_guessed():
    @dataclasses.dataclass
    class Probe:
        documented: int = 1
        """Says what it does."""
        silent: int = 2

    assert field_docs(Probe) == {"documented": "Says what it does."}


def test_default_text_follows_the_preset_table(monkeypatch):
    from engine import presets

    assert default_text("model", "xi") == "default: 0.1"
    real = presets._live

    def slower(context):
        return {**real(context), "train.epochs": presets.Setting(3, "a test's")}

    monkeypatch.setitem(presets.PRESETS, "live", dataclasses.replace(
        presets.PRESETS["live"], rule=slower))
    assert default_text("train", "epochs").startswith("default: 3 (the live preset)")


# ----------------------------------------------------------------------------------------------
# Newcomer's commands


def test_no_command_shows_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "python -m engine train --name first" in out and "gpu-check" in out


def test_data_without_an_action_names_them(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data"])
    assert exc.value.code == 2
    assert "required: {list,check}" in capsys.readouterr().err


def test_a_plain_train_is_the_apps_default_model():
    args = build_parser(["train"]).parse_args(["train", "--name", "x"])
    cfg = build_run_config(args)
    assert (cfg.preset, cfg.model.backbone, cfg.model.head, cfg.data.dataset) == (
        "live", "small_cnn", "loss_attention", "digits")
    assert (cfg.train.epochs, cfg.data.train_size) == (2, 12000)
    for argv, backbone in ((["--preset", "paper"], "resnet18"),
                           (["--backbone", "resnet18"], "resnet18"),
                           (["--preset", "live", "--backbone", "vgg11_bn"], "vgg11_bn"),
                           (["--dataset", "cifar10"], "resnet18")):
        cfg = build_run_config(build_parser(["train"]).parse_args(["train", *argv]))
        assert cfg.model.backbone == backbone, argv


def test_explain_writes_to_explained_by_default(tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save("a.png")
    shipped = ROOT / "checkpoints" / "digits_small_cnn_la.pt"
    assert main(["explain", str(shipped), "a.png"]) == 0
    assert sorted(p.name for p in (tmp_path / "explained").iterdir()) == [
        "a-loss_attention.png", "a-weights.csv", "a.json"]


def test_evaluate_shows_progress_unless_quiet(tmp_path, capsys):
    shipped = str(ROOT / "checkpoints" / "digits_small_cnn_la.pt")
    base = ["evaluate", shipped, "--test-size", "64", "--metrics", "image"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "model pass over digits/test" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "model pass" not in capsys.readouterr().err
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["data"]["images"] == 64


# ----------------------------------------------------------------------------------------------
# A long run says so before it starts


class _Store:
    def list(self):
        return []


def _prepared(*argv: str):
    from engine.train import prepare_run_config

    return prepare_run_config(build_run_config(build_parser(["train"]).parse_args(
        ["train", *argv])))


def test_a_long_run_is_announced_with_its_estimate_and_the_fast_flags():
    cfg = _prepared("--preset", "paper", "--device", "cpu")
    batches = []

    def measure(model_cfg, device, batch, steps):
        batches.append(batch)
        return 1.6  # images/s: the paper's ResNet18 on the 2-core CPU

    found = estimate.estimate(cfg, _Store(), measure)
    # 200 epochs x 12,000 canvases at 1.6 images/s; the second probe's batch stays small
    assert found.seconds == pytest.approx(200 * 12000 / 1.6) and batches == [2, 2]
    note = estimate.long_run_note(found, "cpu", estimate.is_fast(cfg))
    assert note.startswith("note: this run will take about 17 days on this cpu (200 epoch(s) x "
                           "12,000 images at 1.6 images/s, resnet18 timed here on a batch of 2)")
    assert "--backbone small_cnn --preset live" in note


def test_a_short_run_says_nothing_and_is_timed_at_its_own_batch():
    cfg = _prepared("--device", "cpu")
    batches = []

    def measure(model_cfg, device, batch, steps):
        batches.append(batch)
        return 300.0 if batch == 2 else 900.0

    found = estimate.estimate(cfg, _Store(), measure)
    # the second probe at the run's own batch (32, the live preset's) decides
    assert batches == [2, 32] and found.seconds == pytest.approx(2 * 12000 / 900)
    assert estimate.long_run_note(found, "cpu") is None


def test_a_busy_machine_is_not_told_to_use_the_flags_it_uses():
    cfg = _prepared("--device", "cpu")
    batches = []

    def measure(model_cfg, device, batch, steps):  # a swamped machine: 5 images/s
        batches.append(batch)
        return 5.0

    found = estimate.estimate(cfg, _Store(), measure)
    assert batches == [2, 5] and estimate.is_fast(cfg)
    note = estimate.long_run_note(found, "cpu", estimate.is_fast(cfg))
    assert "already the fast settings" in note and "--preset live" not in note


def test_the_estimate_prefers_the_stores_finished_runs(monkeypatch):
    monkeypatch.setattr("engine.sweep.cell_seconds", lambda store, cfg: (1234.0, "history"))
    found = estimate.estimate(_prepared("--device", "cpu"), _Store(),
                              lambda *a: pytest.fail("timed although history was there"))
    assert (found.seconds, found.basis) == (1234.0, "history")
    assert "about 21 min" in estimate.long_run_note(found, "cpu")


def test_durations_read_as_a_person_says_them():
    assert [estimate.duration_text(s) for s in (45, 600, 3 * 3600 + 32 * 60, 10 * 86400)] == [
        "45 s", "10 min", "3 h 32 min", "10 days"]


def test_the_train_command_says_it_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(estimate, "measured_rate", lambda *a: 1.0)
    monkeypatch.setattr("engine.train.train_run", lambda *a, **k: "finished")
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "slow", "--quiet",
                 "--backbone", "resnet18"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("run slow: ") and err[1].startswith("note: this run will take")
    assert "--backbone small_cnn --preset live" in err[2]


# ----------------------------------------------------------------------------------------------
# Processes: a closed pipe, and the cost of the top-level help


def _engine(*argv: str, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "engine", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


# argparse itself ignores a help text it could not write (exit 0); a command's output that
# could not be written ends it with 141, as SIGPIPE ends any Unix tool.
@pytest.mark.parametrize("argv, code", [(("models",), cli.BROKEN_PIPE), (("--help",), 0),
                                        (("data", "list"), cli.BROKEN_PIPE)])
def test_a_reader_that_leaves_ends_the_command_quietly(argv, code):
    proc = _engine(*argv)
    proc.stdout.close()  # before the command writes: its write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == code and err == ""


def test_top_level_help_imports_no_command_group():
    code = ("import sys; from engine.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "light = ('engine.cli', 'engine.cli.commands', 'engine.cli.formatting')\n"
            "heavy = [m for m in sys.modules if m.startswith(('engine.', 'torch', 'pathlib'))\n"
            "         and m not in light]\n"
            "print(heavy, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stderr.strip() == "[]", proc.stderr
    assert "train" in proc.stdout and "gpu-check" in proc.stdout
