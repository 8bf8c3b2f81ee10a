"""The app under bad input and damaged files: no traceback, no lost run, and no access to the
server's file system outside the data roots."""

import json
import os
from pathlib import Path

import pytest
from conftest import errors, open_page
from PIL import Image

from engine.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from engine.roots import DataRoot, data_roots, folder_in_root, shown_relative
from engine.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["home", "explorer", "compare", "curves", "train", "runs", "sweep", "stride", "mil",
         "transfer"]
TINY = {"tr_train_size": 64, "tr_test_size": 32, "tr_epochs": 1, "tr_batch": 32}


@pytest.fixture
def app_env(tmp_path, monkeypatch):
    """A run store and a data root of their own; no other data root."""
    runs, data = tmp_path / "runs", tmp_path / "data-root"
    (data / "pets").mkdir(parents=True)
    for cls in ("cat", "dog"):
        for i in range(4):
            path = data / "pets" / cls / f"{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.new("RGB", (20, 20), (60 * i, 100 if cls == "cat" else 0, 0)).save(path)
    monkeypatch.setenv("LOSSATTN_RUNS", str(runs))
    monkeypatch.setenv("LOSSATTN_DATA", str(data))
    monkeypatch.delenv("LOSSATTN_DATA_ROOTS", raising=False)
    monkeypatch.chdir(tmp_path)  # so that ./data is not the project's
    return runs, data




# ----------------------------------------------------------------------------------------------
# Data roots: the only folders the app reads data from


def test_roots_are_the_configured_folders_only(app_env, tmp_path, monkeypatch):
    _, data = app_env
    extra = tmp_path / "more"
    extra.mkdir()
    monkeypatch.setenv("LOSSATTN_DATA_ROOTS", f"{extra}{os.pathsep}{tmp_path / 'missing'}")
    (tmp_path / "data").mkdir()
    roots = data_roots()
    assert [r.label for r in roots] == ["$LOSSATTN_DATA", "./data", "$LOSSATTN_DATA_ROOTS[0]"]
    assert [r.path for r in roots] == [data.resolve(), (tmp_path / "data").resolve(),
                                       extra.resolve()]


@pytest.mark.parametrize("sub, message", [
    ("/etc", "inside"), ("../..", "inside"), ("pets/../../x", "inside"), ("~", "inside"),
    ("escape", "leads outside"), ("nowhere", "is not a folder"), ("pets/cat/0.png",
                                                                    "is not a folder"),
    ("a" * 300, "cannot be used: File name too long"), ("x\x00y", "control characters")])
def test_sub_folders_cannot_leave_their_root(sub, message, app_env):
    _, data = app_env
    (data / "escape").symlink_to("/etc")
    root = DataRoot("$LOSSATTN_DATA", data.resolve())
    with pytest.raises(ValueError, match=message) as info:
        folder_in_root(root, sub)
    assert str(data) not in str(info.value)  # shown relative to the root
    assert folder_in_root(root, "pets") == (data / "pets").resolve()
    assert folder_in_root(root, "") == data.resolve()
    assert shown_relative(f"missing {data.resolve()}/pets/x", [root]) == (
        "missing $LOSSATTN_DATA/pets/x")


def test_train_page_offers_data_roots_not_server_paths(app_env):
    runs, data = app_env
    at = open_page("train", **TINY)
    root_box = at.selectbox(key="w_tr_root")
    assert root_box.options == ["default (search every data root)", "$LOSSATTN_DATA"]
    at.selectbox(key="w_tr_dataset").set_value("image_folder")
    root_box.set_value("$LOSSATTN_DATA").run()
    for bad in ("/etc", "../../..", "/"):
        at.text_input(key="w_tr_sub").set_value(bad).run()
        assert not at.exception and any("inside $LOSSATTN_DATA" in e for e in errors(at))
        at.button(key="tr_launch").click().run()
        assert not at.exception and not RunStore(runs).names()
        assert not any("/etc" in e and "passwd" in e for e in errors(at))
    at.text_input(key="w_tr_sub").set_value("pets").run()
    at.text_input(key="w_tr_name").set_value("pets-run").run()
    at.button(key="tr_launch").click().run()
    assert not at.exception and not errors(at), errors(at)
    config = RunStore(runs).get("pets-run").config()
    assert config.data.root == str((data / "pets").resolve())


def test_mil_page_reads_only_inside_data_roots(app_env):
    at = open_page("mil")
    assert at.selectbox(key="w_mil_root").options == ["default (search every data root)",
                                                      "$LOSSATTN_DATA"]
    assert at.multiselect(key="w_mil_datasets").options == ["digit_bags"]
    at.selectbox(key="w_mil_root").set_value("$LOSSATTN_DATA").run()
    at.text_input(key="w_mil_sub").set_value("/").run()
    assert not at.exception and any("inside $LOSSATTN_DATA" in e for e in errors(at))
    at.button(key="mil_start").click().run()
    assert not at.exception and any("inside $LOSSATTN_DATA" in e for e in errors(at))


def test_a_root_set_to_the_whole_disk_is_not_walked(monkeypatch, tmp_path):
    """find_folder gives up after a bounded number of folders instead of walking '/'."""
    import time

    from engine.data import DataError, load_split

    start = time.perf_counter()
    with pytest.raises(DataError, match="not found"):
        load_split(DataConfig(dataset="tiny_imagenet", root="/"), "test")
    assert time.perf_counter() - start < 3.0


# ----------------------------------------------------------------------------------------------
# Damaged run stores: every page renders, shows what is wrong, and loses no run


def _damaged_store(runs: Path) -> dict[str, bytes]:
    """Runs with a garbage status, a garbage config, an empty best checkpoint, junk metrics,
    a name that looks like the index, and one good finished run; returns files to keep."""
    store = RunStore(runs)
    for name in ("garbage-status", "garbage-config", "empty-best", "junk-metrics",
                 "index.sqlite-wal"):
        store.create(RunConfig(name=name, model=ModelConfig(backbone="small_cnn"),
                               data=DataConfig(train_size=64, test_size=32),
                               train=TrainConfig(epochs=1, batch_size=32)))
    (runs / "garbage-status" / "status.json").write_text('{"state": "running", "pid": -1, '
                                                         '"epochs_done": "many"')
    (runs / "garbage-config" / "config.json").write_text('{"model": 7, "train": [1]}')
    (runs / "garbage-config" / "status.json").write_text(json.dumps(
        {"state": "running", "process": {"pid": 1, "create_time": 0}}))
    (runs / "empty-best" / "checkpoints" / "best.pt").write_bytes(b"")
    (runs / "empty-best" / "status.json").write_text(json.dumps({"state": "finished"}))
    (runs / "junk-metrics" / "metrics.jsonl").write_text('[1]\n{"epoch": "x"}\nnot json\n')
    (runs / "junk-metrics" / "status.json").write_text(json.dumps({"state": "stopped"}))
    (runs / "_sweeps" / "broken").mkdir(parents=True)
    (runs / "_sweeps" / "broken" / "status.json").write_text("null")
    (runs / "_mil" / "broken").mkdir(parents=True)
    (runs / "_mil" / "broken" / "status.json").write_text('{"state": 3}')
    (runs / "_mil" / "broken" / "results.json").write_text('{"rows": "no"}')
    return {str(p): p.read_bytes() for p in runs.rglob("*") if p.is_file()
            and p.name in ("config.json", "best.pt", "metrics.jsonl")}


@pytest.mark.parametrize("page", PAGES)
def test_every_page_survives_a_damaged_run_store(page, app_env):
    runs, _ = app_env
    kept = _damaged_store(runs)
    at = open_page(page)
    at.run()
    assert not at.exception
    for path, content in kept.items():  # nothing already saved is lost or rewritten
        assert Path(path).read_bytes() == content, path
    assert sorted(RunStore(runs).names()) == sorted(
        ["garbage-status", "garbage-config", "empty-best", "junk-metrics", "index.sqlite-wal"])


def test_runs_page_shows_damage_as_reasons(app_env):
    runs, _ = app_env
    _damaged_store(runs)
    at = open_page("runs")
    table = at.dataframe[0].value
    notes = dict(zip(table["name"], table["note"], strict=True))
    assert "status.json" in notes["garbage-status"]
    assert "process" in notes["garbage-config"] and "state" in table.columns
    assert not set(table["state"]) & {"running", "starting"}  # no dead process shown as live
    assert "skipped images" in table.columns


@pytest.mark.parametrize("page", PAGES)
def test_every_page_survives_an_unusable_run_folder(page, app_env, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run store should be")
    monkeypatch.setenv("LOSSATTN_RUNS", str(blocker))
    at = open_page(page)
    assert not at.exception
    if page in ("train", "runs", "sweep"):
        assert errors(at)  # said, not crashed


def test_explorer_with_an_empty_checkpoint_chosen(app_env):
    runs, _ = app_env
    _damaged_store(runs)
    at = open_page("explorer", model_source="run: empty-best")
    assert not at.exception
    assert any("not a checkpoint of this project" in e or "empty" in e for e in errors(at))
