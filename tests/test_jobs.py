"""Background jobs (engine.jobs): process identity, stop and death, for runs, sweeps, MIL and
benchmarks alike. Never signal a process that is not ours; never show a dead job as running."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import launch as background
from engine.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from engine.job_spec import BenchSpec, TrainSpec
from engine.jobs import ACTIVE, Job, JobError, JobStopped, ProcessIdentity, check_status, wait
from engine.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("job_driver.py")


def tiny_config(name, epochs=1):
    return RunConfig(name=name, model=ModelConfig(backbone="small_cnn"),
                     data=DataConfig(train_size=256, test_size=64),
                     train=TrainConfig(epochs=epochs, batch_size=64))


@pytest.fixture
def bystander():
    """An unrelated process of ours: what a stale pid may name once the OS reuses it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def settle(job, timeout=600.0):
    """The job's status once it is no longer active."""
    return wait(job, timeout=timeout, poll=0.05)


def until(predicate, timeout=600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError("condition not reached")


# ----------------------------------------------------------------------------------------------
# Identity: a pid is not a process


def test_identity_of_this_process_and_of_none():
    me = ProcessIdentity.current()
    assert me.pid == os.getpid() and me.alive()
    assert ProcessIdentity.of(2**22 + 12345) is None  # beyond pid_max: no such process
    for bad in (-1, 0, 1, True, "7", 3.0, None):
        assert ProcessIdentity.of(bad) is None


@pytest.mark.parametrize("value", [
    {"pid": -1, "create_time": 1.0}, {"pid": 0, "create_time": 1.0}, {"pid": 1, "create_time": 1.0},
    {"pid": "123", "create_time": 1.0}, {"pid": True, "create_time": 1.0}, {"pid": 4.5,
                                                                             "create_time": 1.0},
    {"pid": 1234}, {"pid": 1234, "create_time": "yesterday"},
    {"pid": 1234, "create_time": float("nan")}, [1234, 1.0], "1234", 1234])
def test_malformed_identities_are_refused(value):
    with pytest.raises(ValueError, match="pid"):
        ProcessIdentity.parse(value)


def test_a_reused_pid_is_never_signalled(bystander, tmp_path):
    """A status naming a live process with another creation time (the pid was reused) shows
    the job as dead, and stop() leaves that process alone."""
    real = ProcessIdentity.of(bystander.pid)
    stale = ProcessIdentity(bystander.pid, real.create_time - 3600.0)
    assert not stale.alive() and not stale.signal(signal.SIGTERM)
    job = Job(tmp_path / "job")
    job.update(state="running", process=stale.to_dict())
    status = job.status()
    assert status.state == "failed" and "ended unexpectedly" in status.reason
    assert not job.stop()
    time.sleep(0.2)
    assert bystander.poll() is None  # still running: it was never signalled


def test_a_process_on_another_host_is_judged_by_its_heartbeat(bystander, tmp_path):
    """A run store every node mounts: a cell training on another machine records that host.
    Its pid means nothing here, so it is never signalled (only asked, by the STOP file); it is
    running while its status keeps changing, and lost after REMOTE_STALE_S of silence."""
    from engine import jobs

    here = ProcessIdentity.of(bystander.pid)
    there = ProcessIdentity(here.pid, here.create_time, "another-node")
    assert there.remote and not here.remote and not there.matches(here)
    assert not there.alive() and not there.signal(signal.SIGTERM)
    job = Job(tmp_path / "job")
    job.update(state="running", process=there.to_dict())
    assert job.status().state == "running"
    assert job.stop() and job.stop_requested()  # asked, not signalled
    time.sleep(0.2)
    assert bystander.poll() is None
    status = json.loads(job.status_path.read_text())
    status["updated"] = time.time() - jobs.REMOTE_STALE_S - 1
    job.status_path.write_text(json.dumps(status))
    ended = job.status()
    assert ended.state == "stopped"  # silent after a stop request
    job.clear_stop()
    ended = job.status()
    assert ended.state == "failed" and "another-node" in ended.reason
    # A status written before hosts were recorded still means this machine.
    assert ProcessIdentity.parse({"pid": here.pid, "create_time": here.create_time}).alive()


@pytest.mark.parametrize("pid", [-1, 0, 1])
def test_pids_up_to_1_are_never_signalled(pid, tmp_path):
    """kill(-1) would reach every process of the user, kill(0) the whole group."""
    assert not ProcessIdentity(pid, 0.0).signal(signal.SIGTERM)
    job = Job(tmp_path / "job")
    job.update(state="running", process={"pid": pid, "create_time": 0.0})
    assert job.status().state == "failed"  # named as malformed, never "running"
    assert not job.stop()


def test_a_legacy_bare_pid_is_never_trusted(bystander, tmp_path):
    job = Job(tmp_path / "job")
    job.folder.mkdir()
    job.status_path.write_text(json.dumps({"state": "running", "pid": bystander.pid,
                                           "launched": time.time() - 3600}))
    assert job.status().state == "failed"
    assert not job.stop()
    assert bystander.poll() is None


# ----------------------------------------------------------------------------------------------
# Status files: a malformed field is named, never a traceback


@pytest.mark.parametrize("content, field, state", [
    ({"state": "running", "process": {"pid": "abc", "create_time": 1}}, "process", "failed"),
    ({"state": "running", "pid": "abc"}, None, "failed"),  # legacy: dropped, never started
    ({"state": "bogus"}, "state", "failed"),
    ({"state": None}, "state", "failed"),
    ({"state": "finished", "epochs_done": "x"}, "epochs_done", "finished"),
    ({"state": "finished", "best_metric": "0.9"}, "best_metric", "finished"),
    ({"state": "stopped", "reason": 5}, "reason", "stopped"),
    ({"state": "finished", "eta_s": [1]}, "eta_s", "finished"),
    ({"state": "finished", "skipped_train": 1.5}, "skipped_train", "finished"),
])
def test_malformed_status_fields_name_the_file(content, field, state, tmp_path):
    """A bad field is named; only a bad state (or a process that cannot be verified) makes the
    job failed: a bad progress field must not hide what the job is."""
    job = Job(tmp_path / "job")
    job.folder.mkdir()
    content = {**content, "launched": time.time() - 3600}
    job.status_path.write_text(json.dumps(content))
    status = job.status()
    assert status.state == state
    if field:
        assert str(job.status_path) in status.reason and repr(field) in status.reason
        assert status.fields.get(field) != content[field] or field == "state"  # not passed on
    good, problems = check_status(content, "status.json")
    assert ("pid" not in good) and (bool(problems) == (field is not None))


def test_a_live_job_with_a_bad_field_stays_running_and_stoppable(tmp_path):
    """A NaN metric (mAP with no positive) or another version's field must not make a live job
    look dead: Stop must still reach it, and no second process may start on its folder."""
    job = Job(tmp_path / "job")
    with job.attach():
        job.update(last_metric=float("nan"), best_metric=float("inf"))
        assert json.loads(job.status_path.read_text())["last_metric"] is None  # written null
        raw = json.loads(job.status_path.read_text())
        raw["epochs_done"] = "three"  # as another version might write it
        job.status_path.write_text(json.dumps(raw))
        status = job.status()
        assert status.state == "running" and "'epochs_done'" in status.reason
        with pytest.raises(JobError, match="already running"):
            job.spawn(TrainSpec(run_dir=str(job.folder)))
        job.complete(0)
    assert job.status().state == "finished"


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", "\x00\x01", '"running"'])
def test_unreadable_status_files_are_failures(text, tmp_path):
    job = Job(tmp_path / "job")
    job.folder.mkdir()
    job.status_path.write_text(text)
    status = job.status()
    assert status.state == "failed" and str(job.status_path) in status.reason


def test_runs_list_survives_malformed_status_and_config(tmp_path):
    store = RunStore(tmp_path)
    store.create(tiny_config("good"))
    bad = store.create(tiny_config("bad"))
    bad.status_path.write_text(json.dumps({"state": "running", "pid": "abc",
                                           "process": {"pid": -1}, "epochs_done": "x"}))
    weird = store.create(tiny_config("weird"))
    weird.config_path.write_text(json.dumps({"model": 5, "tags": "x"}))
    rows = {r["name"]: r for r in store.list()}
    assert rows["good"]["state"] == "created"
    assert rows["bad"]["state"] == "failed" and "status.json" in rows["bad"]["reason"]
    summary = weird.summary()  # what the index is rebuilt from
    assert summary["backbone"] == "" and summary["tags"] == []
    assert not store.stop("bad")
    with pytest.raises(ValueError, match="config.json is not a valid run config"):
        weird.config()
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"good", "bad", "weird"}


# ----------------------------------------------------------------------------------------------
# Runs: identity recorded at once, death seen at once, stop during start-up ends as stopped


def test_identity_is_recorded_before_the_child_starts_and_death_is_seen_at_once(tmp_path):
    store = RunStore(tmp_path)
    run = background.launch(store, tiny_config("killed-early"))
    process = run.job.process()  # recorded by the starter, not by the child
    assert process is not None and process.alive()
    assert run.raw_status().state in ACTIVE
    os.kill(process.pid, signal.SIGKILL)
    status = until(lambda: (s := run.status()).state not in ACTIVE and s, timeout=60)
    assert status.state == "failed" and "ended unexpectedly" in status.reason
    assert store.list()[0]["state"] == "failed"
    assert background.resume(store, run.name)  # resumable: starts over, no checkpoint yet
    assert background.wait(run, timeout=600).state == "finished"


def test_stop_right_after_launch_ends_as_stopped(tmp_path):
    """SIGTERM before the child has even imported anything: never 'running' afterwards."""
    store = RunStore(tmp_path)
    run = background.launch(store, tiny_config("stopped-early"))
    assert store.stop(run.name)
    status = background.wait(run, timeout=600)
    assert status.state == "stopped", status
    assert not (run.checkpoint_dir / "last.pt").exists()


def test_sigterm_during_set_up_ends_as_stopped_by_the_trainer(tmp_path):
    """The trainer's handler is installed before the run is marked running: a stop while the
    data loads is recorded by the trainer itself, and resume then trains from the start."""
    store = RunStore(tmp_path)
    from engine.train import prepare_run_config

    run = store.create(prepare_run_config(tiny_config("slow-start")))
    proc = subprocess.Popen([sys.executable, str(DRIVER), "slow-data", "train", "--run-dir",
                             str(run.path), "--quiet"], cwd=ROOT)
    until(lambda: run.raw_status().state == "running" and (run.path / "LOADING").exists())
    assert store.stop(run.name)
    assert proc.wait(timeout=600) == 0
    status = run.status()
    assert status.state == "stopped" and "start-up" in status.reason, status
    assert not run.stop_path.exists()  # handled: it cannot stop the resumed process
    assert background.resume(store, run.name)
    assert background.wait(run, timeout=600).state == "finished"


def test_a_second_start_is_refused_while_one_runs(tmp_path):
    store = RunStore(tmp_path)
    run = background.launch(store, tiny_config("twice", epochs=3))
    with pytest.raises(ValueError, match="already running"):
        background.resume(store, run.name)
    with pytest.raises(JobError, match="already running"):
        run.job.spawn(TrainSpec(run_dir=str(run.path)))
    with pytest.raises(ValueError, match="running.*stop it first"):
        store.delete(run.name)
    store.stop(run.name)
    assert background.wait(run, timeout=600).state in ("stopped", "finished")


# ----------------------------------------------------------------------------------------------
# Sweeps, MIL and benchmarks are the same kind of job


def test_mil_experiment_stops_and_is_one_job(tmp_path):
    from engine.mil.config import MilConfig
    from engine.mil.experiment import experiment_status, start_experiment, stop_experiment

    folder = start_experiment(tmp_path, "long", ["digit_bags"], ["loss_attention"],
                              MilConfig(folds=2, repeats=5, epochs=500, patience=500))
    job = Job(folder)
    assert job.process() is not None  # recorded by the starter at once
    until(lambda: experiment_status(folder).state == "running"
          and experiment_status(folder).fields.get("current"))
    assert stop_experiment(folder)
    status = settle(job)
    assert status.state == "stopped", status
    assert not stop_experiment(folder)  # nothing to stop any more


def test_bench_job_records_how_it_ended(tmp_path):
    job = Job(tmp_path / "bench")
    job.spawn(BenchSpec(models=[("small_cnn", "loss_attention")], batch=2, steps=1,
                        isolate=False, device="cpu", json=str(tmp_path / "bench" / "b.json")),
              kind="bench")
    assert settle(job).state == "finished"
    assert json.loads((tmp_path / "bench" / "b.json").read_text())[0]["batch"] == 2
    bad = Job(tmp_path / "bad")
    bad.spawn(BenchSpec(models=[("nope", "loss_attention")]), kind="bench")
    status = settle(bad)
    assert status.state == "failed" and "backbone must be one of" in status.reason
    assert bad.last_output_line().startswith("error: model.backbone must be one of")


def test_a_jobs_error_line_is_written_before_its_status_says_failed(tmp_path, monkeypatch,
                                                                    capsys):
    """Seen on a loaded machine: the status read 'failed' while the log had no line yet (the
    line was printed after attach had marked the job). Now the line comes first, once."""
    from engine.cli import main
    from engine.jobs import JOB_ENV

    job = Job(tmp_path / "bad")
    monkeypatch.setenv(JOB_ENV, str(job.folder))
    printed_when_ended = []
    real_end = Job._end_if_active

    def end(self, me, state, reason):
        printed_when_ended.append((state, capsys.readouterr().err))
        return real_end(self, me, state, reason)

    monkeypatch.setattr(Job, "_end_if_active", end)
    assert main(["bench", "--models", "nope/loss_attention"]) == 2
    assert [state for state, _ in printed_when_ended] == ["failed"]
    assert printed_when_ended[0][1].startswith("error: model.backbone must be one of")
    assert capsys.readouterr().err == ""  # said once, not again on the way out
    assert job.status().state == "failed"


def test_sweep_stop_stops_its_process_and_cell(tmp_path):
    from engine.sweep import launch_sweep, stop_sweep, sweep_job, sweep_runs

    store = RunStore(tmp_path)
    base = tiny_config(None, epochs=30)
    launch_sweep(store, base, [("train.seed", [0, 1])], "stopme")
    job = sweep_job(store, "stopme")
    until(lambda: any(r.raw_status().state == "running"
                      for r in sweep_runs(store, "stopme")))
    stop_sweep(store, "stopme")
    status = settle(job)
    assert status.state == "stopped", status
    states = [r.status().state for r in sweep_runs(store, "stopme")]
    assert "running" not in states and "stopped" in states


def test_attach_marks_every_ending(tmp_path, monkeypatch):
    ok = Job(tmp_path / "ok")
    with ok.attach(finish=True):
        assert ok.status().state == "running" and ok.process().matches(ProcessIdentity.current())
    assert ok.status().state == "finished"
    boom = Job(tmp_path / "boom")
    with pytest.raises(RuntimeError), boom.attach():
        raise RuntimeError("disk on fire")
    assert boom.status().state == "failed"
    assert "disk on fire" in boom.status().reason


def test_a_stop_asked_before_start_stops_a_spawned_job_and_is_stale_for_others(tmp_path,
                                                                               monkeypatch):
    pending = Job(tmp_path / "pending")
    pending.folder.mkdir()
    pending.request_stop()  # asked for while the process was starting
    monkeypatch.setenv("LOSSATTN_JOB_DIR", str(pending.folder))  # this process was spawned for it
    with pytest.raises(BaseException, match="stop requested"), pending.attach():
        pytest.fail("the body must not run")
    assert pending.status().state == "stopped" and not pending.stop_requested()
    monkeypatch.delenv("LOSSATTN_JOB_DIR")
    left = Job(tmp_path / "left")  # a STOP left by a run that ended before it was read
    left.folder.mkdir()
    left.request_stop()
    with left.attach(finish=True):  # a foreground command: the old request is not its own
        assert not left.stop_requested()
    assert left.status().state == "finished"


def test_a_second_sigterm_does_not_break_off_the_first_ones_clean_up(tmp_path):
    """Stop pressed twice: the first SIGTERM stops the job, the second finds it stopping."""
    job = Job(tmp_path / "twice")
    with pytest.raises(JobStopped), job.attach():
        try:
            signal.raise_signal(signal.SIGTERM)
            pytest.fail("SIGTERM did not stop the body")
        except JobStopped:
            signal.raise_signal(signal.SIGTERM)  # during clean-up: ignored, not raised
            raise
    assert job.status().state == "stopped"


def test_a_process_that_cannot_start_is_failed_at_once(tmp_path, monkeypatch):
    import subprocess as sp

    def refuse(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(sp, "Popen", refuse)
    job = Job(tmp_path / "nostart")
    with pytest.raises(OSError):
        job.spawn(TrainSpec(run_dir=str(job.folder)))
    status = job.status()
    assert status.state == "failed" and "Too many open files" in status.reason


def test_a_sigterm_just_after_the_job_is_marked_running_still_ends_it_stopped(tmp_path,
                                                                              monkeypatch):
    """Seen once on a loaded machine: a sweep stopped just as its next cell attached left the
    cell saying running. The signal is simulated where it landed: as the lock that wrote
    'running' is released."""
    import contextlib

    from engine import jobs
    from engine.jobs import JobStopped

    job = Job(tmp_path / "cell")
    real = jobs.locked

    @contextlib.contextmanager
    def locked_then_signalled(path):
        with real(path):
            yield
        if job.raw_status().state == "running":
            raise JobStopped("stopped by SIGTERM")

    monkeypatch.setattr(jobs, "locked", locked_then_signalled)
    with pytest.raises(JobStopped), job.attach():
        pytest.fail("the body must not run")
    assert job.raw_status().state == "stopped"
