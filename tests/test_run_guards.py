"""Guards around a run (issue 30): what this machine cannot run is refused before the run folder
exists, in one line naming the field; settings that disagree with the data or with themselves
are errors, not silently replaced; a traceback only for the unforeseen, and then in the run's
log; a run folder removed under its trainer ends the trainer and is not made again."""

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.config import ConfigError, DataConfig, ModelConfig, RunConfig, config_from_dict
from engine.runs import RunStore
from engine.sweep import parse_grid, parse_grid_notes, sweep_configs
from engine.train import prepare_run_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "small_cnn", "--epochs", "1", "--train-size", "64", "--test-size", "16",
        "--batch-size", "32", "--quiet"]


def run_folders(root: Path) -> list[str]:
    """The run folders under a store (its own files start with '.' or '_')."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith((".", "_")))


def engine_process(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# Refused before the run folder is made


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_on_a_missing_gpu_is_one_line_and_makes_no_run_folder(tmp_path):
    proc = engine_process("train", "--runs-dir", str(tmp_path), "--device", "cuda", *TINY)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert error_lines(err) == [("error: train.device: cuda is not available on this machine "
                                 "(no CUDA GPU visible); use cpu or auto")]
    assert run_folders(tmp_path) == []


def _unavailable_devices() -> list[str]:
    devices = [f"cuda:{torch.cuda.device_count() + 98}"]  # past the last GPU, or no CUDA
    if not torch.backends.mps.is_available():
        devices.append("mps")
    return devices


@pytest.mark.parametrize("device", _unavailable_devices())
def test_every_unavailable_device_is_refused_before_the_run_folder(tmp_path, capsys, device):
    assert main(["train", "--runs-dir", str(tmp_path), "--device", device, *TINY]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: train.device: {device} is not")
    assert "Traceback" not in lines[0]
    assert run_folders(tmp_path) == []


def test_a_gpu_index_past_the_machines_count_names_the_gpus_there(tmp_path, capsys,
                                                                  monkeypatch):
    """As on a machine with two GPUs (this one may have none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["train", "--runs-dir", str(tmp_path), "--device", "cuda:2", *TINY]) == 2
    assert error_lines(capsys.readouterr().err) == [(
        "error: train.device: cuda:2 is not on this machine, whose 2 CUDA GPU(s) are cuda:0 to "
        "cuda:1; use one of them, cuda or auto")]
    assert run_folders(tmp_path) == []


@pytest.mark.parametrize("seed", [2**64, 2**63, -1])
def test_a_seed_outside_int64_is_refused_before_the_run_folder(tmp_path, capsys, seed):
    assert main(["train", "--runs-dir", str(tmp_path), "--seed", str(seed), *TINY]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: train.seed must be an int >= 0 and "
                                                   "< 2**63")
    assert run_folders(tmp_path) == []


def test_the_largest_seed_still_trains(tmp_path):
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "big", "--seed",
                 str(2**63 - 1), *TINY]) == 0
    assert RunStore(tmp_path).get("big").status().state == "finished"


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_a_run_made_for_a_missing_device_says_where_it_can_resume(tmp_path):
    """A run keeps its device: 'use cpu or auto' would not help, so resume says where to go."""
    import json

    from engine import launch

    store = RunStore(tmp_path)
    run = store.create(prepare_run_config(RunConfig(
        name="made-on-a-mac", model=ModelConfig(backbone="small_cnn"),
        data=DataConfig(train_size=64, test_size=16))))
    config = json.loads(run.config_path.read_text())
    config["train"]["device"] = "mps"
    run.config_path.write_text(json.dumps(config))
    run.update_status(state="stopped", reason="stopped on the Mac it was made on")
    with pytest.raises(ConfigError, match=r"run made-on-a-mac cannot resume here: train.device: "
                                          r"mps is not available on this machine \(no Apple MPS "
                                          r"GPU\); a run resumes on the device it was made for"):
        launch.resume(store, "made-on-a-mac")
    assert run.raw_status().state == "stopped"


@pytest.mark.parametrize("section, field, value, words", [
    ("train", "epochs", 10**30, "train.epochs must be at most 100,000"),
    ("train", "batch_size", 2**63, "train.batch_size must be at most"),
    ("data", "train_size", 10**5000, "data.train_size must be at most 100,000,000"),
    ("data", "seed", 2**64, "data.seed must be an int >= 0 and < 2**63"),
    ("data", "input_size", 2**40, "data.input_size must be at most 8,192"),
    ("model", "num_classes", 2**70, "model.num_classes must be at most"),
    ("model", "plain_hidden", [64, 2**63], "model.plain_hidden must be at most"),
    ("loss", "ramp_epochs", 2**64, "loss.ramp_epochs must be at most"),
], ids=lambda v: "huge" if isinstance(v, int) and v.bit_length() > 64 else None)
def test_counts_beyond_what_torch_or_the_store_holds_are_refused(section, field, value, words):
    with pytest.raises(ConfigError) as info:
        config_from_dict(RunConfig, {section: {field: value}})
    assert str(info.value).startswith(words) and "\n" not in str(info.value)


@pytest.mark.parametrize("milestones", [[0.75, 0.5], [0.5, 0.5], [-0.1, 0.5], [0.5, 1.0]])
def test_milestones_must_be_increasing_fractions(milestones):
    with pytest.raises(ConfigError, match=r"^train\.milestones must be"):
        config_from_dict(RunConfig, {"train": {"milestones": milestones}})
    assert config_from_dict(RunConfig, {"train": {"milestones": [0.3, 0.6]}}).train.milestones \
        == (0.3, 0.6)


def test_num_classes_that_disagrees_with_the_data_is_an_error(tmp_path, capsys):
    data = DataConfig(train_size=64, test_size=16)
    with pytest.raises(ConfigError) as info:
        prepare_run_config(RunConfig(model=ModelConfig(backbone="small_cnn", num_classes=5),
                                     data=data))
    assert str(info.value).startswith("model.num_classes is 5 but data set digits has 10 "
                                      "classes")
    # Left at its default it is the data's count; the data's own count is fine too.
    for given in ({}, {"num_classes": 10}):
        cfg = prepare_run_config(RunConfig(model=ModelConfig(backbone="small_cnn", **given),
                                           data=data))
        assert cfg.model.num_classes == 10
    assert main(["train", "--runs-dir", str(tmp_path), "--set", "model.num_classes=3",
                 *TINY]) == 2
    assert "model.num_classes is 3 but data set digits has 10" in capsys.readouterr().err
    assert run_folders(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Sweep grids


def test_repeated_grid_values_are_merged_with_a_note(caplog):
    grid, notes = parse_grid_notes(["loss.gamma_max=0.1,0.10,0,0.1,0.0", "model.head=mean,mean",
                                    "model.xi=1,1.0,true"])
    assert grid == [("loss.gamma_max", [0.1, 0]), ("model.head", ["mean"]),
                    ("model.xi", [1, True])]  # a bool is never the number 1
    assert len(notes) == 3 and notes[0] == ("loss.gamma_max: 3 repeated value(s) merged; each "
                                            "value is trained once (2 distinct: 0.1, 0)")
    many = "model.xi=" + ",".join(["0.1"] * 500)
    with caplog.at_level(logging.WARNING, logger="engine.sweep"):
        assert parse_grid([many]) == [("model.xi", [0.1])]
    assert "499 repeated value(s) merged" in caplog.text
    nested, notes = parse_grid_notes(["model.stride_plan=[[1,1,1,1],[1,1,1,1.0],[1,2,1,1]]"])
    assert nested == [("model.stride_plan", [[1, 1, 1, 1], [1, 2, 1, 1]])] and len(notes) == 1


def test_a_grid_with_repeats_makes_each_cell_once():
    base = {"model": {"backbone": "small_cnn"}, "data": {"train_size": 64, "test_size": 16}}
    configs = sweep_configs(base, [("model.xi", [0.1] * 500), ("loss.gamma_max", [0, 0.0])],
                            "dups")
    assert len(configs) == 1 and configs[0].model.xi == 0.1


def test_cli_sweep_prints_the_merge_note_and_refuses_a_missing_device(tmp_path, capsys):
    code = main(["sweep", "--runs-dir", str(tmp_path), "--grid", "model.xi=0.1,0.10",
                 "--device", "cuda:99", "--backbone", "small_cnn", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "note: --grid model.xi: 1 repeated value(s) merged" in err
    assert err.strip().splitlines()[-1].startswith("error: train.device: cuda:99 is not")
    assert run_folders(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# The unforeseen: one console line, the traceback in the run's log


def test_an_unforeseen_error_is_one_console_line_and_a_traceback_in_the_log(
        tmp_path, capsys, monkeypatch):
    from engine import train

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the step")

    monkeypatch.setattr(train, "_step", broken)
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "bug", *TINY]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    run = RunStore(tmp_path).get("bug")
    pointing = [line for line in err.splitlines() if "traceback is in" in line]
    assert len(pointing) == 1
    assert pointing[0].endswith(f"unexpected RuntimeError: a bug in the step; the traceback is "
                                f"in {run.log_path}")
    log_text = run.log_path.read_text()
    assert "Traceback (most recent call last)" in log_text and "in broken" in log_text
    status = run.status()
    assert status.state == "failed" and "RuntimeError: a bug in the step" in status.reason


def test_an_expected_error_during_training_has_no_traceback_anywhere(tmp_path, monkeypatch):
    from engine import train
    from engine.errors import DataError

    def missing(*args, **kwargs):
        raise DataError("the data went away")

    store = RunStore(tmp_path)
    run = store.create(prepare_run_config(RunConfig(
        name="gone-data", model=ModelConfig(backbone="small_cnn"),
        data=DataConfig(train_size=64, test_size=16))))
    monkeypatch.setattr(train, "load_split", missing)
    assert train.train_run(run, progress_bar=False) == "failed"
    assert "Traceback" not in run.log_path.read_text()
    assert "the data went away" in run.log_path.read_text()
    assert run.status().reason == "DataError: the data went away"


# ----------------------------------------------------------------------------------------------
# A run folder removed under its trainer


def _wait_until(condition, what: str, deadline_s: float = 300.0, proc=None) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the trainer ended before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {deadline_s:.0f} s: {what}")
        time.sleep(0.05)


def _remove(folder: Path) -> None:
    """rm -rf while the trainer may be writing into the folder (a file can appear meanwhile)."""
    while folder.exists():
        shutil.rmtree(folder, ignore_errors=True)


LONG = ["--backbone", "small_cnn", "--epochs", "1000", "--train-size", "128", "--test-size",
        "16", "--batch-size", "32", "--quiet"]


def test_a_removed_run_folder_ends_its_trainer_as_failed_and_stays_removed(tmp_path):
    folder = tmp_path / "doomed"
    proc = engine_process("train", "--runs-dir", str(tmp_path), "--name", "doomed", *LONG)
    try:
        _wait_until(lambda: (folder / "metrics.jsonl").is_file(), "its first epoch", proc=proc)
        _remove(folder)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert [line for line in err.splitlines() if "run folder removed" in line] == [
        next(line for line in err.splitlines() if "ERROR run folder removed" in line)]
    assert err.strip().splitlines()[-1] == "run doomed: failed"
    assert "Traceback" not in err
    assert not folder.exists() and run_folders(tmp_path) == []
    assert main(["runs", "list", "--runs-dir", str(tmp_path)]) == 0


def test_a_background_trainer_whose_folder_is_removed_does_not_make_it_again(tmp_path):
    from engine import launch

    store = RunStore(tmp_path)
    run = store.create(prepare_run_config(RunConfig(
        name="bg", model=ModelConfig(backbone="small_cnn"),
        data=DataConfig(train_size=128, test_size=16),
        train=config_from_dict(RunConfig, {"train": {"epochs": 1000, "batch_size": 32}}).train)))
    identity = launch.start(store, run)
    assert identity is not None
    _wait_until(lambda: run.metrics_path.is_file(), "its first epoch")
    _remove(run.path)
    _wait_until(lambda: not identity.alive(), "the trainer's exit")
    assert not run.path.exists() and run_folders(tmp_path) == []


def test_a_write_that_raced_the_removal_is_taken_back_but_never_anothers_run(tmp_path):
    """The window between the check and a write: the write remade the folder (atomic writes
    make their parents); the check after it removes what it made, and only that."""
    from engine.folder_guard import FolderGuard, RunFolderRemoved
    from engine.runs import Run

    folder = tmp_path / "raced"
    folder.mkdir()
    with FolderGuard(folder) as guard:
        guard.check()  # the folder it began in
        shutil.rmtree(folder)
        Run(folder).update_status(epoch=3)  # a status write into the gone folder remakes it
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.pt").write_bytes(b"x")
        with pytest.raises(RunFolderRemoved, match="^run folder removed: "):
            guard.check()
        assert not folder.exists()
    # A new run of the same name (its config, its created status) is someone else's: kept.
    store = RunStore(tmp_path)
    folder.mkdir()
    with FolderGuard(folder) as guard:
        shutil.rmtree(folder)
        store.create(RunConfig(name="raced"))
        with pytest.raises(RunFolderRemoved):
            guard.check()
    assert (folder / "config.json").is_file() and (folder / "status.json").is_file()


def test_a_new_runs_config_being_written_is_never_taken_back(tmp_path):
    """The old trainer of a removed run, checking while a new run of the same name is being
    made (its folder, checkpoints/ and a config.json temp file): it leaves them alone."""
    from engine.folder_guard import FolderGuard, RunFolderRemoved

    folder = tmp_path / "again"
    folder.mkdir()
    with FolderGuard(folder) as guard:
        folder.rmdir()
        (folder / "checkpoints").mkdir(parents=True)
        (folder / ".config.json.k3j4.tmp").write_text("{}")
        with pytest.raises(RunFolderRemoved):
            guard.check()
    assert (folder / ".config.json.k3j4.tmp").is_file() and (folder / "checkpoints").is_dir()
