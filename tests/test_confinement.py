"""Issue 30, parts 1 and 2: the server reads data only inside its roots, checked on the file
actually opened, and every file it reads from a run store or data folder is a regular file of
bounded size (no FIFO hangs it, no endless device fills its memory)."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import errors, open_page
from PIL import Image

from engine.checkpoint import atomic_torch_save
from engine.config import DataConfig
from engine.errors import DataError, FileRefused
from engine.roots import (
    CONFINE_ENV,
    check_data_folder,
    confine_reads_to,
    confinement,
    data_roots,
    inside_roots,
    open_data,
)
from engine.runs import RunStore
from engine.safe_io import read_bytes, read_json
from engine.slots import job_environment

ROOT = Path(__file__).resolve().parents[1]
TINY = {"tr_train_size": 64, "tr_test_size": 32, "tr_epochs": 1, "tr_batch": 32}


def _pngs(folder: Path, n: int = 4, shade: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (12, 12), (40 * i, shade, 0)).save(folder / f"{i}.png")


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """A data root with a class folder set ``pets`` in it, a folder outside every root, a run
    store; reads unconfined until a test confines them."""
    data, outside, runs = tmp_path / "root", tmp_path / "outside", tmp_path / "runs"
    for cls in ("cat", "dog"):
        _pngs(data / "pets" / cls, shade=100 if cls == "cat" else 0)
    _pngs(outside / "secret", shade=200)
    monkeypatch.setenv("LOSSATTN_DATA", str(data))
    monkeypatch.setenv("LOSSATTN_RUNS", str(runs))
    monkeypatch.delenv("LOSSATTN_DATA_ROOTS", raising=False)
    monkeypatch.chdir(tmp_path)
    return data, outside, runs


def _folder_config(root: Path) -> DataConfig:
    return DataConfig(dataset="image_folder", root=str(root), test_size=None)


def _load(root: Path):
    from engine.data import load_split

    return load_split(_folder_config(root), "train", use_cache=False)


def _in_time(fn, seconds: float = 60.0):
    """``fn()``'s result or exception, failing the test (not hanging it) past ``seconds``."""
    box: dict = {}

    def work():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still reading after {seconds} s: it hangs"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ----------------------------------------------------------------------------------------------
# Confinement at the moment of reading


def test_confinement_is_what_the_app_sets_and_jobs_inherit(roots):
    data, _, _ = roots
    assert confinement() is None  # the CLI reads what its user names
    confine_reads_to(data_roots())
    assert confinement() == [data.resolve()]
    assert job_environment()[CONFINE_ENV] == str(data.resolve())  # passed to every job


def test_a_class_folder_linking_outside_is_refused_only_when_confined(roots):
    data, outside, _ = roots
    (data / "pets" / "zz_secret").symlink_to(outside / "secret")
    assert "zz_secret" in _load(data / "pets").classes  # the CLI follows its user's links
    confine_reads_to(data_roots())
    with pytest.raises(DataError, match="class folder .*zz_secret leads outside the data roots"):
        _load(data / "pets")


def test_an_image_linking_outside_is_refused_where_it_is_opened(roots):
    data, outside, _ = roots
    (data / "pets" / "cat" / "9.png").symlink_to(outside / "secret" / "0.png")
    confine_reads_to(data_roots())
    with pytest.raises(DataError, match=r"9.png leads outside the data roots"):
        _load(data / "pets")
    with pytest.raises(FileRefused, match="leads outside"):
        open_data(outside / "secret" / "0.png", 2**20, "an image")


def test_links_that_stay_inside_the_roots_are_fine(roots):
    data, _, _ = roots
    _pngs(data / "elsewhere" / "bird", shade=50)
    (data / "pets" / "bird").symlink_to(data / "elsewhere" / "bird")
    (data / "pets" / "cat" / "9.png").symlink_to(data / "elsewhere" / "bird" / "0.png")
    confine_reads_to(data_roots())
    loaded = _load(data / "pets")
    assert loaded.classes == ["bird", "cat", "dog"]


def test_a_recorded_data_root_outside_the_roots_is_refused_before_it_is_listed(roots):
    outside = roots[1]
    check_data_folder(outside)  # unconfined: anything goes
    confine_reads_to(data_roots())
    with pytest.raises(DataError, match="outside the app's data roots .*LOSSATTN_DATA_ROOTS"):
        check_data_folder(outside)
    with pytest.raises(DataError, match=f"data folder of image_folder {outside}"):
        _load(outside)


def test_a_mil_set_folder_linking_outside_is_refused(roots):
    from engine.mil.data import load_mil_dataset

    data, outside, _ = roots
    (outside / "musk1").mkdir()
    (data / "mil").mkdir()
    (data / "mil" / "musk1").symlink_to(outside / "musk1")
    confine_reads_to(data_roots())
    with pytest.raises(DataError, match="MIL set folder .*leads outside the data roots"):
        load_mil_dataset(str(data / "mil" / "musk1"))
    (outside / "bags.csv").write_text("1,2,a,1\n3,4,b,0\n")
    (data / "bags.csv").symlink_to(outside / "bags.csv")
    with pytest.raises(DataError, match="bags.csv leads outside the data roots"):
        load_mil_dataset(str(data / "bags.csv"))


def test_a_job_started_by_a_confined_process_is_confined_too(roots):
    """The process boundary: a CLI child with the app's setting refuses the link, with one line
    and no traceback; the same command without it reads what it is told."""
    data, outside, _ = roots
    (data / "pets" / "zz_secret").symlink_to(outside / "secret")
    command = [sys.executable, "-m", "engine", "data", "check", "image_folder",
               "--data-root", str(data / "pets")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    free = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False)
    assert free.returncode == 0, free.stderr
    confined = subprocess.run(command, env={**env, CONFINE_ENV: str(data.resolve())},
                              capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert confined.returncode != 0
    assert "zz_secret leads outside the data roots" in confined.stderr
    assert "Traceback" not in confined.stderr


def test_the_train_page_cannot_train_on_a_link_below_its_sub_folder(roots):
    """Issue 30's first harmful case, end to end: the sub-folder is inside the root, a class
    folder in it links out; the launched job fails naming it and learns no outside class."""
    data, outside, runs = roots
    (data / "pets" / "zz_secret").symlink_to(outside / "secret")
    at = open_page("train", **TINY)
    at.selectbox(key="w_tr_dataset").set_value("image_folder")
    at.selectbox(key="w_tr_root").set_value("$LOSSATTN_DATA").run()
    at.text_input(key="w_tr_sub").set_value("pets").run()
    at.text_input(key="w_tr_name").set_value("linked").run()
    at.button(key="tr_launch").click().run()
    assert not at.exception
    # refused while the page prepares the run (it reads the data, confined), so no run exists;
    # a job that reads it instead is refused too (the test above)
    assert "zz_secret leads outside the data roots" in " ".join(errors(at)), errors(at)
    assert "linked" not in RunStore(runs).names()


def test_the_explorer_says_which_root_a_recorded_run_needs(roots):
    """A run whose config records a data folder outside the roots (a CLI run elsewhere, or a
    copied checkpoint): the Explorer lists nothing below it and says what it needs."""
    _, outside, runs = roots
    for i in range(30):
        (outside / f"folder{i}").mkdir()
    folder = runs / "elsewhere"
    (folder / "checkpoints").mkdir(parents=True)
    ckpt = torch.load(ROOT / "checkpoints" / "digits_live_gamma0.1.pt", weights_only=True)
    config = ckpt["run_config"]
    config["name"] = "elsewhere"
    config["data"].update(dataset="image_folder", root=str(outside))
    atomic_torch_save(ckpt, folder / "checkpoints" / "best.pt")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "status.json").write_text(json.dumps({"state": "finished"}))
    at = open_page("explorer", model_source="run: elsewhere")
    assert not at.exception
    said = " ".join(errors(at))
    assert "outside the app's data roots" in said and "LOSSATTN_DATA_ROOTS" in said, said
    shown = " ".join(str(e.value) for e in at.get("selectbox")) + said
    assert "folder29" not in shown


# ----------------------------------------------------------------------------------------------
# Bounded reads


def test_a_fifo_named_like_an_image_is_left_out_not_waited_on(roots):
    data = roots[0]
    os.mkfifo(data / "pets" / "cat" / "pipe.png")
    loaded = _in_time(lambda: _load(data / "pets"))
    assert len(loaded) + len(_in_time(lambda: _test_split(data / "pets"))) == 8


def _test_split(root: Path):
    from engine.data import load_split

    return load_split(_folder_config(root), "test", use_cache=False)


def test_reads_refuse_devices_fifos_and_oversize_files_naming_them(tmp_path):
    os.mkfifo(tmp_path / "status.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "big.json").write_bytes(b" " * 2000)
    with pytest.raises(FileRefused, match=r"status.json is a FIFO \(named pipe\), not a file"):
        _in_time(lambda: read_json(tmp_path / "status.json", "a job status"), 10)
    with pytest.raises(FileRefused, match="zero.json is a character device"):
        read_json(tmp_path / "zero.json", "a job status")
    with pytest.raises(FileRefused, match=r"big.json is 2,000 bytes; a config may be at most "
                                          r"1,000 bytes"):
        read_bytes(tmp_path / "big.json", 1000, "a config")


def test_runs_list_and_the_runs_page_survive_a_status_linked_to_an_endless_device(roots):
    _, _, runs = roots
    for name, target in (("zero", "/dev/zero"), ("urandom", "/dev/urandom")):
        folder = runs / name
        (folder / "checkpoints").mkdir(parents=True)
        config = torch.load(ROOT / "checkpoints" / "digits_live_gamma0.1.pt",
                            weights_only=True)["run_config"]
        (folder / "config.json").write_text(json.dumps({**config, "name": name}))
        (folder / "status.json").symlink_to(target)
        (folder / "metrics.jsonl").symlink_to(target)
    os.mkfifo(runs / "zero" / "process.log")
    started = time.monotonic()
    listed = _in_time(lambda: subprocess.run(
        [sys.executable, "-m", "engine", "runs", "list"], capture_output=True, text=True,
        cwd=ROOT, timeout=300, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)}), 300)
    assert listed.returncode == 0, listed.stderr
    assert "zero" in listed.stdout and "urandom" in listed.stdout
    assert len(listed.stdout) < 20_000
    at = _in_time(lambda: open_page("runs"), 300)
    notes = " ".join(map(str, at.dataframe[0].value["note"]))
    assert "character device" in notes, notes
    assert time.monotonic() - started < 300
    assert RunStore(runs).get("zero").metrics() == []


def test_an_image_folder_with_train_but_no_test_says_so(tmp_path):
    _pngs(tmp_path / "set" / "train" / "cat")
    _pngs(tmp_path / "set" / "train" / "dog")
    with pytest.raises(DataError, match="has train/ but no test/ \\(or val/\\)"):
        _test_split(tmp_path / "set")
    with pytest.raises(DataError, match="has train/ but no test/"):
        _load(tmp_path / "set")
    _pngs(tmp_path / "set" / "val" / "cat")
    _pngs(tmp_path / "set" / "val" / "dog")
    assert _test_split(tmp_path / "set").classes == ["cat", "dog"]


# ----------------------------------------------------------------------------------------------
# Review findings: each a way out that the first version left open


def test_a_file_outside_is_neither_opened_nor_described(roots, tmp_path):
    data = roots[0]
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    (data / "pw.png").symlink_to(tmp_path / "big.bin")
    (data / "zero.png").symlink_to("/dev/zero")
    for name in ("pw.png", "zero.png"):
        with pytest.raises(FileRefused) as refused:
            read_bytes(data / name, 100, "an image", [data.resolve()])
        assert str(refused.value) == f"{data / name} leads outside the data roots (a link?); " \
                                     "refused"  # no size, no kind of what lies outside


def test_a_split_folder_linking_outside_is_refused_before_it_is_listed(roots):
    data, outside, _ = roots
    for split in ("train", "test"):
        _pngs(outside / "split" / split / "owl")
    (data / "ds").mkdir()
    (data / "ds" / "train").symlink_to(outside / "split" / "train")
    (data / "ds" / "test").symlink_to(outside / "split" / "test")
    confine_reads_to(data_roots())
    with pytest.raises(DataError, match="image folder split .*ds/train leads outside") as refused:
        _load(data / "ds")
    assert "owl" not in str(refused.value)
    with pytest.raises(ValueError, match="test_split must be None or a plain folder name"):
        DataConfig(dataset="image_folder", root=str(data / "ds"), test_split="../../x")


def test_tiny_imagenet_lists_only_plain_file_names(tmp_path):
    from engine.data.tiny_imagenet import _tiny_entries

    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "val_annotations.txt").write_text("../../etc/x.JPEG\tn01\t0\t0\t8\t8\n")
    with pytest.raises(DataError, match="val_annotations.txt: '../../etc/x.JPEG' is not a plain"):
        _tiny_entries(tmp_path, "test", ["n01"])


def test_ray_cells_carry_the_apps_confinement(roots):
    from engine.cluster import _runtime_env

    data = roots[0]
    confine_reads_to(data_roots())
    env = _runtime_env()["env_vars"]
    assert env[CONFINE_ENV] == str(data.resolve())


def test_a_relative_data_root_is_made_absolute_for_the_jobs(roots, monkeypatch):
    data = roots[0]
    monkeypatch.setenv("LOSSATTN_DATA", "root")  # relative to the server's folder
    confine_reads_to(data_roots())
    assert os.environ["LOSSATTN_DATA"] == str(data.resolve())


def test_a_log_tail_reads_only_the_end_and_never_waits_on_a_fifo(tmp_path):
    from engine.safe_io import read_tail

    log = tmp_path / "process.log"
    log.write_text("".join(f"line {i}\n" for i in range(2_000_000)))  # about 25 MB
    assert read_tail(log, "a log", 100).splitlines()[-1] == "line 1999999"
    assert len(read_tail(log, "a log", 100)) == 100
    os.mkfifo(tmp_path / "fifo.log")
    with pytest.raises(FileRefused, match="FIFO"):
        _in_time(lambda: read_tail(tmp_path / "fifo.log", "a log"), 10)


def test_generated_data_shares_one_cache_entry_confined_or_not(roots, monkeypatch, tmp_path):
    from engine.data import load_split

    monkeypatch.setenv("LOSSATTN_CACHE", str(tmp_path / "cache"))
    config = DataConfig(train_size=None, test_size=None)
    load_split(config, "test")
    confine_reads_to(data_roots())
    load_split(config, "test")
    assert len(list((tmp_path / "cache").glob("digits-test-*.pt"))) == 1


def test_a_loop_of_links_as_a_class_folder_is_refused_not_a_crash(roots):
    data = roots[0]
    (data / "pets" / "loop").symlink_to(data / "pets" / "loop2")
    (data / "pets" / "loop2").symlink_to(data / "pets" / "loop")
    (data / "pets" / "zz").symlink_to(data / "pets" / "loop")
    confine_reads_to(data_roots())
    assert not inside_roots(data / "pets" / "zz")
    assert inside_roots(data / "pets" / "cat")
