"""The store's compute slots (issue 34): the thread budget, the queue of background jobs, and
the local sweep executor running cells side by side."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import launch
from engine.budget import holding
from engine.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from engine.jobs import dispatch, queue_place
from engine.runs import RunStore
from engine.slots import (
    LIMIT_ENV,
    THREADS_ENV,
    Slots,
    budget_for,
    cores,
    fixed_threads,
    job_limit,
    store_root_of,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _budget_env(monkeypatch):
    """These tests measure the budget itself: no thread count pinned by the environment."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS", LIMIT_ENV):
        monkeypatch.delenv(name, raising=False)


def tiny(name, epochs=1, threads=None):
    return RunConfig(name=name, model=ModelConfig(backbone="small_cnn"),
                     data=DataConfig(train_size=64, test_size=32),
                     train=TrainConfig(epochs=epochs, batch_size=32, threads=threads))


def wait_for(predicate, what: str, timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def other_process():
    """A live process of ours that is not this one (another job's, for the budget)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


# ----------------------------------------------------------------------------------------------
# Settings


def test_the_budget_divides_the_cores_among_the_jobs_that_hold_slots():
    n = cores()
    assert budget_for(1) == n
    assert budget_for(2) == max(1, n // 2)
    assert budget_for(n * 4) == 1   # never below one thread
    assert budget_for(0) == n       # this process, alone


@pytest.mark.parametrize("text", ["0", "-2", "many", "1.5"])
def test_a_queue_limit_that_is_not_a_positive_int_names_the_variable(monkeypatch, text):
    monkeypatch.setenv(LIMIT_ENV, text)
    with pytest.raises(ConfigError, match=LIMIT_ENV):
        job_limit()


def test_limit_and_pinned_threads_come_from_the_environment(monkeypatch):
    assert job_limit() == cores() and fixed_threads() is None
    monkeypatch.setenv(LIMIT_ENV, "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert job_limit() == 3 and fixed_threads() == 2
    monkeypatch.setenv(THREADS_ENV, "1")  # the project's own variable wins
    assert fixed_threads() == 1
    monkeypatch.setenv(THREADS_ENV, "0")
    with pytest.raises(ConfigError, match=THREADS_ENV):
        fixed_threads()


@pytest.mark.parametrize("value", [0, -1, "2", 1.5])
def test_train_threads_must_be_a_positive_int(value):
    with pytest.raises(ConfigError, match="train.threads"):
        TrainConfig(threads=value)


@pytest.mark.parametrize("flag, message", [(["--threads", "0"], "train.threads"),
                                           (["--threads", "-3"], "train.threads"),
                                           (["--threads", "x"], "--threads")])
def test_the_threads_flag_refuses_what_is_not_a_positive_int(tmp_path, flag, message):
    out = subprocess.run([sys.executable, "-m", "engine", "train", "--dataset", "digits",
                          "--backbone", "small_cnn", "--runs-dir", str(tmp_path), *flag],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_job_folder_belongs_to_its_store(tmp_path):
    assert store_root_of(tmp_path / "runs" / "my-run") == (tmp_path / "runs").resolve()
    assert store_root_of(tmp_path / "runs" / "_sweeps" / "s") == (tmp_path / "runs").resolve()


# ----------------------------------------------------------------------------------------------
# The thread budget of a process that computes


def test_holding_takes_a_slot_and_follows_the_budget(tmp_path, other_process):
    before = torch.get_num_threads()
    slots = Slots(tmp_path)
    with holding(tmp_path, tmp_path / "a") as budget:
        assert slots.held() == 1 and budget.threads == cores() == torch.get_num_threads()
        slots.write_lease(other_process.pid, tmp_path / "b")  # another job starts computing
        assert budget.follow() == budget_for(2) or cores() == 1
        assert torch.get_num_threads() == budget_for(2)
        other_process.kill()
        other_process.wait()
        budget.follow()  # the other job is gone: its lease no longer counts
        assert torch.get_num_threads() == cores() and slots.held() == 1
    assert slots.held() == 0 and torch.get_num_threads() == before  # slot given back


def test_pinned_threads_never_follow_the_budget(tmp_path, other_process):
    with holding(tmp_path, tmp_path / "a", threads=1) as budget:
        Slots(tmp_path).write_lease(other_process.pid, tmp_path / "b")
        assert budget.follow() is None and torch.get_num_threads() == 1
        assert budget.source == "pinned"


def test_a_lease_of_a_process_that_died_is_dropped(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    slots = Slots(tmp_path)
    slots.write_lease(proc.pid, tmp_path / "killed")
    proc.wait()
    assert slots.held() == 0 and not list(slots.folder.glob("*.json"))


def test_a_run_records_the_threads_it_used(tmp_path):
    store = RunStore(tmp_path)
    run = launch.launch(store, tiny("pinned", threads=1))
    assert launch.wait(run, timeout=600).state == "finished"
    status = run.status().fields
    assert status["cpu_threads"] == 1 and status["threads_from"] == "pinned"
    assert run.metrics()[-1]["cpu_threads"] == [1]
    run = launch.launch(store, tiny("budget"))
    assert launch.wait(run, timeout=600).state == "finished"
    assert run.status().fields["threads_from"] == "budget"
    assert run.metrics()[-1]["cpu_threads"] == [cores()]  # alone: every core


# ----------------------------------------------------------------------------------------------
# The queue


def test_jobs_beyond_the_limit_queue_and_start_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "1")
    store = RunStore(tmp_path)
    long = launch.launch(store, tiny("long", epochs=500))
    second = launch.launch(store, tiny("second"))
    third = launch.launch(store, tiny("third"))
    assert long.status().state in ("starting", "running")
    assert second.status().state == third.status().state == "queued"
    assert queue_place(second.path) == (1, 2) and queue_place(third.path) == (2, 2)
    with pytest.raises(ValueError, match="queued"):  # not twice
        launch.start(store, second)
    # a queued job stops at once, and never starts
    assert store.stop("third")
    assert third.status().state == "stopped" and "queued" in third.status().reason
    assert queue_place(second.path) == (1, 1)
    wait_for(lambda: long.status().state == "running", "the first job to run")
    store.stop("long")
    # the stopped job gave its slot back, which started the next in the queue
    assert launch.wait(second, timeout=600).state == "finished"
    assert long.status().state == "stopped" and third.status().state == "stopped"
    assert not Slots(tmp_path).queued()
    # its process gives the slot back as it exits, a moment after it wrote 'finished'
    wait_for(lambda: Slots(tmp_path).held() == 0, "the finished job's slot to be given back")
    store.delete("third")  # a job that never started can go


def test_a_queued_job_survives_a_restart_and_the_next_look_starts_it(tmp_path, monkeypatch,
                                                                    other_process):
    """The app server (or whoever started the first job) is gone, the job holding the slot was
    killed without giving it back: the queued job is a folder saying ``queued``, and a look at
    the store (dispatch) starts it."""
    monkeypatch.setenv(LIMIT_ENV, "1")
    store = RunStore(tmp_path)
    slots = Slots(tmp_path)
    slots.write_lease(other_process.pid, tmp_path / "busy")  # a job computing elsewhere
    waiting = launch.launch(store, tiny("waiting"))
    assert waiting.status().state == "queued"
    assert json.loads(waiting.job.spec_path.read_text())["kind"] == "train"
    assert dispatch(tmp_path) == []  # the slot is still held
    other_process.kill()
    other_process.wait()
    assert dispatch(tmp_path) == [waiting.path.resolve()]
    assert launch.wait(waiting, timeout=600).state == "finished"


def test_the_cli_says_a_background_run_is_queued(tmp_path, other_process):
    Slots(tmp_path).write_lease(other_process.pid, tmp_path / "busy")
    env = {**os.environ, LIMIT_ENV: "1"}
    out = subprocess.run([sys.executable, "-m", "engine", "train", "--dataset", "digits",
                          "--backbone", "small_cnn", "--train-size", "64", "--test-size", "32",
                          "--epochs", "1", "--batch-size", "32", "--name", "q", "--background",
                          "--runs-dir", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0 and "queued run q (place 1 of 1)" in out.stdout, out.stderr
    listing = subprocess.run([sys.executable, "-m", "engine", "runs", "list", "--runs-dir",
                              str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600, check=False)
    assert "queued" in listing.stdout and "place 1 of 1" in listing.stdout
    RunStore(tmp_path).stop("q")


def test_a_job_that_only_watches_takes_no_slot(tmp_path, monkeypatch, other_process):
    monkeypatch.setenv(LIMIT_ENV, "1")
    Slots(tmp_path).write_lease(other_process.pid, tmp_path / "busy")
    from engine.job_spec import TrainSpec
    from engine.train import prepare_run_config

    run = RunStore(tmp_path).create(prepare_run_config(tiny("watcher")))
    job = run.job
    identity = job.spawn(TrainSpec(run_dir=str(run.path)), compute=False)  # every slot taken
    assert identity is not None
    wait_for(lambda: job.status().state == "finished", "the watcher to end")


# ----------------------------------------------------------------------------------------------
# Sweeps side by side


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["peers"][0]["model"]


def test_cells_side_by_side_equal_cells_one_after_another_with_pinned_threads(tmp_path):
    """The local executor runs cells as background jobs (here both at once, each its own
    process); with the threads pinned, each cell's weights are those of the same cell trained
    in this process, bit for bit (with the budget the thread counts, and so the last bits of
    the sums, follow the load)."""
    from engine.sweep import run_sweep, sweep_configs

    grid = [("loss.gamma_max", [0.0, 0.3])]
    base = {"data": {"dataset": "digits", "train_size": 96, "test_size": 32},
            "model": {"backbone": "small_cnn"}, "train": {"threads": 1, "epochs": 2}}
    apart, together = RunStore(tmp_path / "serial"), RunStore(tmp_path / "parallel")
    run_sweep(apart, sweep_configs(json.loads(json.dumps(base)), grid, "s"), parallel=1,
              progress_bar=False, log=lambda m: None)
    run_sweep(together, sweep_configs(json.loads(json.dumps(base)), grid, "s"), parallel=2,
              log=lambda m: None)
    for name in apart.names():
        assert together.get(name).status().state == "finished"
        a, b = weights(apart.get(name).last_checkpoint), weights(together.get(name).last_checkpoint)
        assert all(torch.equal(a[k], b[k]) for k in a), name


# ----------------------------------------------------------------------------------------------
# The queue's corners (review of the first version)


def test_a_queued_job_starts_with_the_environment_it_was_queued_with(tmp_path, monkeypatch,
                                                                     other_process):
    from engine.slots import environment_for

    monkeypatch.setenv(LIMIT_ENV, "1")
    monkeypatch.setenv("LOSSATTN_DATA", "/data/of/the/launcher")
    Slots(tmp_path).write_lease(other_process.pid, tmp_path / "busy")
    run = launch.launch(RunStore(tmp_path), tiny("envy"))
    recorded = json.loads(run.job.start_path.read_text())["environment"]
    assert recorded["LOSSATTN_DATA"] == "/data/of/the/launcher"
    assert "LOSSATTN_JOB_DIR" not in recorded
    # whoever starts it later (a Ray worker with its own pinned threads, a shell without the
    # data root) gives it the launcher's, not its own
    monkeypatch.setenv("LOSSATTN_DATA", "/elsewhere")
    monkeypatch.setenv(THREADS_ENV, "7")
    env = environment_for(recorded)
    assert env["LOSSATTN_DATA"] == "/data/of/the/launcher" and THREADS_ENV not in env
    assert env["PATH"] == os.environ["PATH"]
    RunStore(tmp_path).stop("envy")


def test_a_job_queued_on_another_host_is_not_started_here(tmp_path, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "1")
    store = RunStore(tmp_path)
    run = store.create(tiny("theirs"))
    run.update_status(state="queued")
    slots = Slots(tmp_path)
    slots.queue_folder.mkdir(parents=True)
    (slots.queue_folder / "00000000000000000001-1.json").write_text(json.dumps(
        {"job": str(run.path.resolve()), "host": "another-node"}))
    assert dispatch(tmp_path) == [] and run.status().state == "queued"
    assert queue_place(run.path) == (1, 1)  # still shown in its place


def test_a_new_launch_waits_behind_the_queue_even_when_a_slot_is_free(tmp_path, monkeypatch,
                                                                       other_process):
    monkeypatch.setenv(LIMIT_ENV, "1")
    store = RunStore(tmp_path)
    Slots(tmp_path).write_lease(other_process.pid, tmp_path / "busy")
    first = launch.launch(store, tiny("first"))
    other_process.kill()  # the slot frees, but nobody has looked at the queue yet
    other_process.wait()
    later = launch.launch(store, tiny("later"))
    assert later.status().state == "queued" and queue_place(later.path) == (2, 2)
    assert dispatch(tmp_path) == [first.path.resolve()]  # first come, first served
    assert launch.wait(first, timeout=600).state == "finished"
    assert launch.wait(later, timeout=600).state == "finished"  # started by first's end


def test_a_lost_queue_entry_is_made_again_and_stop_and_delete_clear_it(tmp_path, monkeypatch,
                                                                        other_process):
    monkeypatch.setenv(LIMIT_ENV, "1")
    store = RunStore(tmp_path)
    slots = Slots(tmp_path)
    slots.write_lease(other_process.pid, tmp_path / "busy")
    run = launch.launch(store, tiny("lost"))
    for pointer, *_ in slots.queue_entries():
        pointer.unlink()  # an interrupted start or a hand: the folder says queued, no entry
    assert slots.place(run.path) is None
    with pytest.raises(ValueError, match=r"already queued \(place 1 of 1\)"):
        launch.start(store, run)  # asking where it is queues it again
    assert slots.place(run.path) == (1, 1)
    store.stop("lost")
    assert not slots.queue_entries()  # the stopped job is out of the queue at once
    gone = launch.launch(store, tiny("gone"))
    store.delete("gone")
    assert not slots.queue_entries() and not gone.path.exists()
    other_process.kill()
    other_process.wait()
    assert dispatch(tmp_path) == [] and not gone.path.exists()  # nothing re-created


def test_a_sweep_that_trains_its_cells_itself_takes_a_slot(tmp_path, monkeypatch,
                                                           other_process):
    """``--parallel auto`` is one cell at a time where the limit is 1: then the sweep's own
    process trains, so it queues like any job that computes."""
    from engine.sweep import launch_sweep, stop_sweep, sweep_status

    monkeypatch.setenv(LIMIT_ENV, "1")
    store = RunStore(tmp_path)
    Slots(tmp_path).write_lease(other_process.pid, tmp_path / "busy")
    assert launch_sweep(store, tiny("base"), [("loss.gamma_max", [0.0, 0.3])], "s",
                        parallel="auto") is None
    assert sweep_status(store, "s").state == "queued"
    stop_sweep(store, "s")
    assert sweep_status(store, "s").state == "stopped"


def test_store_roots_named_like_job_folders_are_their_own(tmp_path):
    assert store_root_of(tmp_path / "_runs" / "r") == (tmp_path / "_runs").resolve()
    assert store_root_of(tmp_path / ".lossattn" / "_mil" / "e") == (
        tmp_path / ".lossattn").resolve()


def test_a_lease_is_found_by_its_process_within_the_clock_tolerance(tmp_path, other_process):
    slots = Slots(tmp_path)
    lease = slots.write_lease(other_process.pid, tmp_path / "a")
    shifted = json.loads(lease.path.read_text())
    shifted["create_time"] += 0.3  # the parent read the creation time before a clock step
    lease.path.rename(tmp_path / "_slots" / f"{other_process.pid}-1.json")
    (tmp_path / "_slots" / f"{other_process.pid}-1.json").write_text(json.dumps(shifted))
    assert slots.lease_of(other_process.pid) is not None
