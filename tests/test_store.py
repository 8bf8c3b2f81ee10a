"""The run store cannot be broken by a name, and interrupted writes leave nothing behind."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from engine.fsutil import atomic_write, remove_temp_files
from engine.runs import INDEX_NAME, RunError, RunStore

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("job_driver.py")
STORE_OWN = ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "index.sqlite-journal"]


def config(name):
    return RunConfig(name=name, model=ModelConfig(backbone="small_cnn"),
                     data=DataConfig(train_size=256, test_size=64),
                     train=TrainConfig(epochs=1, batch_size=64))


@pytest.mark.parametrize("name", STORE_OWN + ["index", "sqlite", "status.json", "config.json",
                                              "checkpoints", "STOP", "a" * 80])
def test_names_that_look_like_store_files_are_safe(name, tmp_path):
    """Such a name used to delete the index and break every page; the store's own files now
    start with '.', which no run name can."""
    store = RunStore(tmp_path)
    store.create(config("first"))
    store.list()
    store.create(config(name))
    assert sorted(r["name"] for r in store.list()) == sorted(["first", name])
    assert (tmp_path / INDEX_NAME).is_file()
    assert store.get(name).config().name == name
    store.delete(name)
    assert [r["name"] for r in store.list()] == ["first"]


@pytest.mark.parametrize("name", [".index.sqlite", ".hidden", "_sweeps", "_mil", "-x", "a/b",
                                  "../up", "..", ".", "", "a" * 81, "sp ace", "é", "a\nb",
                                  "x\x00y"])
def test_names_outside_the_run_namespace_are_refused(name, tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises((ConfigError, RunError), match="letters, digits"):
        store.create(config(name)) if name else store.get(name)
    with pytest.raises(RunError, match="invalid run name"):
        store.get(name)
    assert list(tmp_path.iterdir()) in ([], [tmp_path / INDEX_NAME])


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z"))
def test_any_name_the_store_accepts_is_safe(tmp_path, name):
    root = tmp_path / f"store-{abs(hash(name))}"
    store = RunStore(root)
    store.create(config("keeper"))
    if name != "keeper":
        store.create(config(name))
    names = {r["name"] for r in store.list()}
    assert names == {"keeper", name}
    assert store.rebuild_index() == len(names)
    assert {r["name"] for r in RunStore(root).list()} == names


def test_a_legacy_index_among_the_runs_is_removed(tmp_path):
    import sqlite3

    with closing(sqlite3.connect(tmp_path / "index.sqlite")) as conn, conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE runs1 (name)")  # the older layout's own index
        (tmp_path / "index.sqlite-wal").touch()  # as a crash leaves them beside it
        (tmp_path / "index.sqlite-shm").touch()
    store = RunStore(tmp_path)
    assert not any((tmp_path / legacy).exists() for legacy in STORE_OWN)
    store.create(config("index.sqlite"))  # the name is free now
    assert [r["name"] for r in store.list()] == ["index.sqlite"]


# ----------------------------------------------------------------------------------------------
# Temp files of interrupted atomic writes


def test_interrupted_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def failing(fh):
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_temp_files_are_removed_by_age_and_pattern(tmp_path):
    stale = tmp_path / ".last.pt.abc123.tmp"
    fresh = tmp_path / "sub" / ".status.json.def456.tmp"
    user = tmp_path / "notes.tmp"  # not ours: no leading dot
    fresh.parent.mkdir()
    for path in (stale, fresh, user):
        path.write_bytes(b"x" * 1000)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert remove_temp_files(tmp_path, older_than_s=3600) == 1000
    assert not stale.exists() and fresh.exists() and user.exists()
    assert remove_temp_files(tmp_path) == 1000
    assert not fresh.exists() and user.exists()


def test_kill_during_a_checkpoint_write_loses_nothing(tmp_path):
    """SIGKILL between a checkpoint's temp file and its rename: the previous last.pt is intact,
    the temp file is removed when the run resumes, and the run finishes."""
    from engine.checkpoint import load_checkpoint
    from engine.launch import resume, wait
    from engine.train import prepare_run_config

    store = RunStore(tmp_path)
    cfg = config("killed-in-save")
    cfg.train = TrainConfig(epochs=3, batch_size=64)
    run = store.create(prepare_run_config(cfg))
    proc = subprocess.Popen([sys.executable, str(DRIVER), "pause-in-save:2", "train",
                             "--run-dir", str(run.path), "--quiet"], cwd=ROOT)
    deadline = time.monotonic() + 600
    while not (run.path / "SAVING").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    before = run.last_checkpoint.read_bytes()
    temps = list(run.checkpoint_dir.glob(".last.pt.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the new one, complete, unrenamed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = run.status()
    assert status.state == "failed" and "ended unexpectedly" in status.reason
    assert run.last_checkpoint.read_bytes() == before
    assert load_checkpoint(run.last_checkpoint)["progress"]["epoch"] == 1
    resume(store, run.name)
    assert wait(run, timeout=600).state == "finished"
    assert not list(run.path.rglob("*.tmp"))
    assert "temp files" in run.log_path.read_text()
    assert [r["epoch"] for r in run.metrics()] == [0, 1, 2]


def test_an_empty_last_checkpoint_fails_the_resume_with_a_reason(tmp_path):
    from engine.train import prepare_run_config, train_run

    store = RunStore(tmp_path)
    run = store.create(prepare_run_config(config("empty-last")))
    run.last_checkpoint.write_bytes(b"")
    run.update_status(state="stopped")
    assert train_run(run, resume=True, progress_bar=False) == "failed"
    status = run.status()
    assert status.state == "failed"
    assert "empty" in status.reason and "last.pt" in status.reason
    assert json.loads(run.status_path.read_text())["state"] == "failed"  # written, not derived


def test_a_run_made_before_skip_unreadable_existed_keeps_skipping(tmp_path):
    store = RunStore(tmp_path)
    run = store.create(config("old"))
    data = json.loads(run.config_path.read_text())
    del data["data"]["skip_unreadable"]  # as an older version wrote config.json
    run.config_path.write_text(json.dumps(data))
    assert run.config().data.skip_unreadable is True
    assert store.create(config("new")).config().data.skip_unreadable is False


def test_an_unusable_index_never_fails_a_run_or_the_table(tmp_path):
    store = RunStore(tmp_path)
    run = store.create(config("indexless"))
    store.index_path.unlink()
    store.index_path.mkdir()  # sqlite cannot open a folder: every index call fails
    run.update_status(state="stopped")
    store.index(run)  # logged, not raised
    assert [(r["name"], r["state"]) for r in store.list()] == [("indexless", "stopped")]


def test_someone_elses_index_sqlite_is_left_alone(tmp_path):
    import sqlite3

    foreign = tmp_path / "index.sqlite"
    with closing(sqlite3.connect(foreign)) as conn, conn:
        conn.execute("CREATE TABLE photos (name)")
    RunStore(tmp_path)
    assert foreign.exists()
    ours = tmp_path / "old-store"
    ours.mkdir()
    with closing(sqlite3.connect(ours / "index.sqlite")) as conn, conn:
        conn.execute("CREATE TABLE runs1 (name)")
    RunStore(ours)
    assert not (ours / "index.sqlite").exists()
