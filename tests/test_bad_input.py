"""Bad input is a clear error naming what is wrong: config fields of every type, files that are
not what they claim, and the command line (one line, exit 2; a traceback only with --debug)."""

import dataclasses
import json
import random
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import CheckpointError, load_checkpoint, load_state, state_mismatch
from engine.cli import main
from engine.config import (
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
)
from engine.mil.config import MilConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "digits_small_cnn_la.pt"
SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "train": TrainConfig}


# ----------------------------------------------------------------------------------------------
# Every config field takes its own type only


def _fields(kind: str):
    """(section, field) of every field whose annotation is (or includes) ``kind``."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if kind in str(hints[f.name]).replace("typing.", ""):
                yield section, f.name


BOOL_FIELDS = [(s, f) for s, f in _fields("bool")]


def test_every_boolean_field_is_found():
    assert ("train", "compile") in BOOL_FIELDS and ("data", "skip_unreadable") in BOOL_FIELDS
    assert len(BOOL_FIELDS) >= 8


@pytest.mark.parametrize("section, field", BOOL_FIELDS)
@pytest.mark.parametrize("value", ["no", "false", "true", "0", 0, 1, 1.0, [], {}])
def test_booleans_take_true_or_false_only(section, field, value):
    """train.compile=no once ran torch.compile for 303 s."""
    with pytest.raises(ConfigError, match=rf"^{section}\.{field} must be true or false"):
        config_from_dict(RunConfig, {section: {field: value}})


@pytest.mark.parametrize("section, field, value, allowed", [
    ("train", "epochs", 2.5, "an int"), ("train", "epochs", True, "an int"),
    ("train", "epochs", "10", "an int"), ("train", "batch_size", None, "an int"),
    ("train", "lr", "0.1", "a finite number"), ("train", "lr", float("inf"), "a finite number"),
    ("train", "milestones", "0.5", "a list of finite numbers"),
    ("train", "milestones", [0.5, "x"], "a list of finite numbers"),
    ("train", "momentum", None, "a finite number"), ("train", "seed", -1, "an int >= 0"),
    ("model", "xi", "0.1", "a finite number"), ("model", "xi", float("nan"), "a finite number"),
    ("model", "xi", 1.5, "a number in \\[0, 1\\]"), ("model", "stride_plan", "1,2",
                                                     "a list of ints or null"),
    ("model", "input_size", [32, 32, 3], "an int or a pair"), ("model", "head", 5, "a string"),
    ("model", "plain_hidden", [64, -1], "a tuple of positive ints"), ("data", "train_size", 0,
                                                          "None .*or a positive int"),
    ("data", "root", 7, "a string or null"), ("data", "resize", "crop", "one of"),
    ("data", "dataset", None, "a string"), ("loss", "gamma_max", -0.1, "a finite number >= 0"),
    ("loss", "ramp_epochs", 1.5, "an int or null"),
])
def test_fields_of_other_types_name_the_field(section, field, value, allowed):
    with pytest.raises(ConfigError, match=rf"^{section}\.{field} must be {allowed}"):
        config_from_dict(RunConfig, {section: {field: value}})


@pytest.mark.parametrize("data, message", [
    ({"train": 5}, "train must be a JSON object"), ({"model": [1]}, "model must be a JSON"),
    ({"data": "digits"}, "data must be a JSON"), ({"loss": None}, "loss must be a JSON"),
    ({"tags": "abc"}, "tags must be a list of strings"), ({"name": 3}, "name must be"),
    ({"train": {"epochz": 3}}, "unknown field.*epochz.*in train"), ([], "must be a JSON object"),
])
def test_config_shapes_are_checked(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(RunConfig, data)


def test_valid_values_still_pass_and_lists_become_tuples():
    cfg = config_from_dict(RunConfig, {"train": {"milestones": [0.3, 0.6], "compile": False},
                                       "model": {"stride_plan": [1, 2, 1, 1], "xi": 1},
                                       "tags": ["a"]})
    assert cfg.train.milestones == (0.3, 0.6) and cfg.model.stride_plan == (1, 2, 1, 1)
    assert cfg.tags == ("a",) and cfg.model.xi == 1


@pytest.mark.parametrize("field, value", [("epochs", "5"), ("hidden", (64, "a")),
                                          ("lam", True), ("select", 3), ("folds", 2.0)])
def test_mil_config_checks_types_too(field, value):
    with pytest.raises(ConfigError, match=field):
        MilConfig(**{field: value})


# ----------------------------------------------------------------------------------------------
# Files that are not what they claim


# Seeded noise: the same test ids in every pytest-xdist worker (they must collect alike).
_NOISE = random.Random(0)


@pytest.mark.parametrize("content", [
    b"", b"\x00", _NOISE.randbytes(2048), b"hello world\n", b"PK\x03\x04" + _NOISE.randbytes(64),
    b"\x80\x02}q\x00."], ids=["empty", "nul", "noise", "text", "zip-noise", "pickle"])
def test_broken_checkpoints_say_not_a_checkpoint_of_this_project(content, tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project") as info:
        load_checkpoint(path)
    text = str(info.value)
    assert str(path) in text and "weights_only" not in text and "False" not in text


def test_checkpoint_that_is_a_folder_or_has_a_bad_version(tmp_path):
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path / "dir.pt")
    ckpt = load_checkpoint(SHIPPED)
    torch.save({**ckpt, "version": "2"}, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="malformed version"):
        load_checkpoint(tmp_path / "v.pt")
    torch.save({**ckpt, "model": [1, 2]}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="lacks 'model'"):
        load_checkpoint(tmp_path / "m.pt")


def test_state_dict_mismatch_names_the_first_keys(tmp_path):
    from engine.models import build_model

    ckpt = load_checkpoint(SHIPPED)
    model = build_model(ModelConfig(**ckpt["run_config"]["model"]))
    state = dict(ckpt["model"])
    first = next(iter(state))
    state.pop(first)
    state["extra.weight"] = torch.zeros(1)
    name, tensor = next((k, v) for k, v in state.items() if v.dim() == 4)
    state[name] = torch.zeros(*tensor.shape[:-1], tensor.shape[-1] + 1)
    with pytest.raises(CheckpointError) as info:
        load_state(model, {**ckpt, "model": state}, "x.pt")
    text = str(info.value)
    assert f"missing keys {first}" in text and "unexpected keys extra.weight" in text
    assert f"wrong shapes {name}" in text
    assert state_mismatch({"a": torch.zeros(1)}, {"a": torch.zeros(1)}) == ""


@pytest.mark.parametrize("content", [b"", b"just some text\n", _NOISE.randbytes(300),
                                     b"MATLAB 5.0 MAT-file" + b"\x00" * 40],
                         ids=["empty", "text", "noise", "mat-header"])
def test_broken_mat_files_name_the_file(content, tmp_path):
    from engine.data import DataError, load_split
    from engine.mil.data import MilDataError, load_mat_folder

    for name in ("X.mat", "Bag2.mat", "BagI.mat"):
        (tmp_path / "mil" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "mil" / name).write_bytes(content)
    with pytest.raises(MilDataError, match=r"X\.mat.*(empty|not a readable MATLAB)"):
        load_mat_folder(tmp_path / "mil")
    (tmp_path / "svhn" / "test_32x32.mat").parent.mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(content)
    with pytest.raises(DataError, match=r"test_32x32\.mat.*(empty|not a readable MATLAB)"):
        load_split(DataConfig(dataset="svhn", root=str(tmp_path / "svhn")), "test")


def test_svhn_mat_with_the_wrong_arrays_names_them(tmp_path):
    from scipy.io import savemat

    from engine.data import DataError, load_split

    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((5, 5)), "y": np.zeros(3)})
    with pytest.raises(DataError, match="'X' must be a 32x32x3xN"):
        load_split(DataConfig(dataset="svhn", root=str(tmp_path)), "test")


# ----------------------------------------------------------------------------------------------
# The command line: one line and exit 2 for an expected error; --debug for the traceback


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("config, message", [
    ({"train": 5}, "section 'train' must be a JSON object"),
    ([1, 2], "must hold a JSON object; it holds a list"),
    ({"train": {"compile": "no"}}, "train.compile must be true or false"),
])
def test_config_file_errors_name_the_file(config, message, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    assert main(["train", "--config", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = _one_error_line(capsys)
    assert message in err and str(path) in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "train.compile=no"], "train.compile must be true or false"),
    (["train", "--set", "compile=yes"], "--set needs"),
    (["train", "--epochs", "2", "--set", "model.xi=2"], "model.xi must be a number in"),
    (["evaluate", "missing.pt"], "checkpoint missing.pt does not exist"),
    (["evaluate", "missing-run"], "no run named 'missing-run'"),
    (["evaluate", str(SHIPPED), "--set", "train.epochs=3"], "evaluate --set needs data.FIELD"),
    (["runs", "show", "../etc"], "invalid run name"),
    (["resume", "nope"], "no run named 'nope'"),
    (["sweep", "--grid", "loss.gamma_max="], "has no values"),
    (["sweep", "--parallel", "many"], "--parallel must be"),
    (["data", "check", "image_folder", "--data-root", "/nonexistent"], "does not exist"),
    (["mil", "--dataset", "nope", "--out"], "unknown MIL data set"),
    (["mil", "--epochs", "0", "--out"], "epochs must be an int >= 1"),
    (["mil", "--threads", "-3", "--out"], "--threads must be a positive int"),
    (["mil", "--threads", "0", "--out"], "--threads must be a positive int"),
    (["train", "--threads", "0"], "train.threads"),
    (["bench-eval", "/dev/null"], "/dev/null is a character device, not a file"),
])
def test_expected_errors_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    if argv[-1] == "--out":  # never the repository's results/mil
        argv = [*argv, str(tmp_path / "out")]
    assert main([*argv, *(["--runs-dir", str(tmp_path)] if argv[0] in (
        "train", "resume", "evaluate", "sweep") else [])]) == 2
    assert not (tmp_path / "out").exists()  # a refused command writes nothing
    assert message in _one_error_line(capsys)


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from engine import cli

    def broken(args):
        raise KeyError("surprise")

    parser = cli.build_parser

    def patched(*args):
        p = parser(*args)
        p._subparsers._group_actions[0].choices["models"].set_defaults(func=broken)
        return p

    monkeypatch.setattr(cli, "build_parser", patched)
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        cli.main(["models", "--debug"])


def test_debug_flag_in_a_real_process_prints_the_traceback():
    base = [sys.executable, "-m", "engine", "runs", "show", "../x"]
    quiet = subprocess.run(base, capture_output=True, text=True, timeout=600, cwd=ROOT,
                           check=False)
    loud = subprocess.run([*base, "--debug"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, check=False)
    assert quiet.returncode == 2 and quiet.stderr.count("\n") == 1
    assert "Traceback" in loud.stderr and "RunError" in loud.stderr


def test_runs_alone_lists_the_runs(tmp_path, capsys):
    from engine.runs import RunStore

    RunStore(tmp_path).create(RunConfig(name="listed"))
    for argv in (["runs", "--runs-dir", str(tmp_path)],
                 ["runs", "list", "--runs-dir", str(tmp_path)],
                 ["runs", "--runs-dir", str(tmp_path), "list"]):
        assert main(argv) == 0
        assert "listed" in capsys.readouterr().out


def test_sweep_names_from_tags_never_lead_out_of_the_sweep_folder(tmp_path):
    from engine.runs import RunStore
    from engine.sweep import list_sweeps, sweep_folder

    store = RunStore(tmp_path)
    store.create(RunConfig(name="tagged", tags=("sweep:../../escape", "sweep:fine")))
    assert list_sweeps(store) == ["fine"]
    with pytest.raises(ConfigError, match="sweep name"):
        sweep_folder(store, "../../escape")
