"""Sweeps on a Ray cluster (engine/cluster.py): a local Ray with as many CPUs as a cell trains
with (one cell at a time), started here.

Ray is in the test requirements (requirements-cluster.txt via requirements-dev.txt), so these
tests run wherever the suite does; a missing Ray fails them at import."""

import json
import os
import signal
import sys
import threading
import time

import pytest
import ray
import torch

from engine.checkpoint import load_checkpoint, peer_state
from engine.cli import main
from engine.cluster import CellResources, RayExecutor, connect
from engine.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from engine.jobs import JobStopped
from engine.runs import RunStore
from engine.sweep import launch_sweep, run_sweep, sweep_configs, sweep_job, sweep_status
from engine.train import prepare_run_config

CELL = {"data": {"dataset": "digits", "train_size": 256, "test_size": 64},
        "model": {"backbone": "small_cnn"}, "train": {"epochs": 2, "batch_size": 64}}
THREADS = torch.get_num_threads()
"""Each cell's task declares the threads this process trains with, so that the two executors
compute exactly the same floating-point sums."""


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at nice 15: on a machine busy with other work they got about 5 %
    # of a core and these tests crawled (seen with two busy loops beside the suite).
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Room for one cell at a time: the stop tests need cells still queued behind a running one.
    address = connect(None, local_cpus=THREADS)
    yield address
    ray.shutdown()


def ray_executor(**kw) -> RayExecutor:
    return RayExecutor(resources=CellResources(cpus=THREADS, **kw))


def weights(path):
    return peer_state(load_checkpoint(path))


def cell_args(root, name, *more):
    return ["sweep", "--runs-dir", str(root), "--dataset", "digits", "--backbone", "small_cnn",
            "--train-size", "256", "--test-size", "64", "--batch-size", "64", "--quiet",
            "--sweep-name", name, *more]


def test_a_ray_sweep_equals_the_local_one(cluster, tmp_path):
    """The same 2x2 (γmax x ξ) digits sweep by both executors: the same runs, bit for bit, and
    the same table; the Ray one is a sweep like any other in the store. The local executor runs
    its cells side by side, so both pin the threads (with the budget each local cell's count
    would follow how many run at once)."""
    common = ["--epochs", "2", "--threads", str(THREADS)]
    assert main(cell_args(tmp_path / "local", "grid", *common)) == 0
    assert main(cell_args(tmp_path / "ray", "grid", *common, "--executor", "ray",
                          "--ray-cpus", str(THREADS))) == 0
    local, remote = RunStore(tmp_path / "local"), RunStore(tmp_path / "ray")
    names = [r["name"] for r in local.list()]
    assert len(names) == 4 and names == [r["name"] for r in remote.list()]
    for name in names:
        assert remote.get(name).status().state == "finished"
        a = weights(local.get(name).last_checkpoint)
        b = weights(remote.get(name).last_checkpoint)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=f"{name} {key}")
        learned = ("train_loss", "test_loss", "test_acc", "patches_selected")
        curves = [[{k: row[k] for k in learned} for row in store.get(name).metrics()]
                  for store in (local, remote)]
        assert curves[0] == curves[1] and len(curves[0]) == 2
    report = {s: json.loads((tmp_path / s / "_sweeps/grid/report.json").read_text())["rows"]
              for s in ("local", "ray")}
    for x, y in zip(report["local"], report["ray"], strict=True):
        assert x["accuracy"] == y["accuracy"] and x["f_paper"] == pytest.approx(y["f_paper"])
    status = sweep_status(remote, "grid")
    assert status.state == "finished" and status.fields["executor"] == "ray"


def _kill_when_checkpointed(run, killed: list) -> None:
    """SIGKILL the cell's worker process once it has a checkpoint and is still training."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run.raw_status()
        if status.state in ("finished", "failed"):
            return
        if status.state == "running" and status.fields.get("epochs_done", 0) >= 1:
            os.kill(status.process.pid, signal.SIGKILL)
            killed.append(status.fields["epochs_done"])
            return
        time.sleep(0.02)


def test_a_killed_worker_is_retried_and_the_cell_resumes(cluster, tmp_path):
    """A worker killed mid-cell: Ray retries the task, the run resumes from its checkpoint (not
    from epoch 0) and ends with the weights of an uninterrupted cell."""
    grid = [("train.seed", [0])]
    base = {**CELL, "train": {**CELL["train"], "epochs": 4}}
    kill_store, calm_store = RunStore(tmp_path / "killed"), RunStore(tmp_path / "calm")
    (cell,) = sweep_configs(base, grid, "faults")
    killer_run = kill_store.create(prepare_run_config(cell))
    killed: list[int] = []
    killer = threading.Thread(target=_kill_when_checkpointed, args=(killer_run, killed))
    killer.start()
    run_sweep(kill_store, [cell], ray=ray_executor(), log=lambda m: None)
    killer.join()
    assert killed and killed[0] < 4, "the cell finished before it could be killed"
    run = kill_store.get(cell.name)
    assert run.status().state == "finished"
    log = (run.path / "log.txt").read_text()
    assert f"resumed {cell.name} at epoch {killed[0]}" in log
    run_sweep(calm_store, sweep_configs(base, grid, "faults"), log=lambda m: None)
    a, b = weights(run.last_checkpoint), weights(calm_store.get(cell.name).last_checkpoint)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    assert [r["epoch"] for r in run.metrics()] == [0, 1, 2, 3]


def test_a_cell_that_fails_for_its_own_reason_is_not_retried(cluster, tmp_path):
    """A non-finite loss is the cell's own failure: it ends failed with its reason, once, and
    the other cells of the sweep still train."""
    store = RunStore(tmp_path)
    configs = sweep_configs(CELL, [("train.lr", [0.05, 1e30])], "bad")
    run_sweep(store, configs, ray=ray_executor(), log=lambda m: None)
    good, bad = (store.get(c.name) for c in configs)
    assert good.status().state == "finished"
    status = bad.status()
    assert status.state == "failed" and "non-finite" in status.reason
    starts = (bad.path / "log.txt").read_text().count(f"run {bad.name}:")
    assert starts == 1  # trained once: a real failure is not retried


def test_stopping_a_ray_sweep_stops_its_tasks(cluster, tmp_path):
    """The Sweep page's and the CLI's stop: the cell in training checkpoints and ends stopped,
    the queued ones never start, and Ray's CPUs are free again."""
    store = RunStore(tmp_path)
    base = RunConfig(name="stopme", model=ModelConfig(backbone="small_cnn"),
                     data=DataConfig(train_size=256, test_size=64),
                     train=TrainConfig(epochs=30, batch_size=64))
    launch_sweep(store, base, [("train.seed", [0, 1, 2])], "stopme",
                 ray=RayExecutor(cluster, CellResources(cpus=THREADS)))
    first = "stopme-00-seed0"
    deadline = time.monotonic() + 600
    while not (store.exists(first) and store.get(first).raw_status().fields.get("step")):
        assert time.monotonic() < deadline, f"no cell stepped: {sweep_status(store, 'stopme')}"
        time.sleep(0.1)
    assert main(["sweep", "--runs-dir", str(store.root), "--sweep-name", "stopme",
                 "--stop"]) == 0
    deadline = time.monotonic() + 600
    while sweep_status(store, "stopme").state in ("starting", "running"):
        assert time.monotonic() < deadline, "the sweep did not stop"
        time.sleep(0.2)
    states = {r["name"]: store.get(r["name"]).status().state for r in store.list()}
    status = sweep_status(store, "stopme")
    assert status.state == "stopped", status.reason
    assert states[first] == "stopped" and store.get(first).last_checkpoint.is_file()
    assert sorted(states.values()) == ["created", "created", "stopped"]
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "Ray tasks still hold CPUs after the stop"
        time.sleep(0.2)


def _sigterm_when_stepped(run, sent: list) -> None:
    """SIGTERM this very process (the sweep's driver), once the cell has taken a step."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not run.raw_status().fields.get("step"):
        time.sleep(0.05)
    if run.raw_status().fields.get("step"):
        os.kill(os.getpid(), signal.SIGTERM)
        sent.append(True)


def test_sigterm_while_the_driver_waits_on_ray_stops_the_sweep(cluster, tmp_path):
    """SIGTERM alone (no STOP file) reaching the driver inside ray.wait: the sweep ends stopped,
    not failed. Ray runs the handler inside its C++ wait, where the JobStopped the jobs' handler
    raises came out as a SystemError; the driver now only sets a flag there."""
    store = RunStore(tmp_path)
    configs = sweep_configs({**CELL, "train": {**CELL["train"], "epochs": 30}},
                            [("train.seed", [0, 1])], "term")
    first = store.create(prepare_run_config(configs[0]))
    sent: list[bool] = []
    killer = threading.Thread(target=_sigterm_when_stepped, args=(first, sent))
    job, before = sweep_job(store, "term"), signal.getsignal(signal.SIGTERM)
    executor = RayExecutor(resources=CellResources(cpus=THREADS),
                           stop_requested=job.stop_requested)
    # job.attach: the jobs' SIGTERM handler, as in `engine sweep`
    with pytest.raises(JobStopped), job.attach(kind="sweep"):
        killer.start()
        run_sweep(store, configs, ray=executor, log=lambda m: None)
    killer.join()
    assert sent, "the cell never stepped"
    assert job.status().state == "stopped", job.status().reason
    assert first.status().state == "stopped" and first.last_checkpoint.is_file()
    assert store.get(configs[1].name).status().state == "created"
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers were put back


def test_bad_resources_and_a_missing_ray_are_named(monkeypatch):
    from engine.cluster import import_ray

    with pytest.raises(ConfigError, match="cpus > 0"):
        CellResources(cpus=0)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match="requirements-cluster.txt"):
        import_ray()


def test_sigterm_while_joining_ray_goes_to_the_sweeps_handler(monkeypatch, tmp_path):
    """ray.init replaces the SIGTERM handler with sys.exit for as long as it joins; a stop in
    that window still stops the sweep (not `failed: SystemExit`), and the handler is back."""
    from engine.jobs import Job

    def init(**kw):  # what ray.init does on a SIGTERM: its handler exits
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs first
        raise AssertionError("SIGTERM did not arrive")

    fake = type(sys)("ray")
    fake.is_initialized, fake.init = lambda: False, init
    monkeypatch.setitem(sys.modules, "ray", fake)
    job, before = Job(tmp_path / "sweep"), signal.getsignal(signal.SIGTERM)
    with pytest.raises(JobStopped), job.attach(kind="sweep"):
        connect("192.0.2.1:6379")
    assert job.status().state == "stopped"
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_sweep_page_launches_on_ray_and_shows_it_like_a_local_sweep(cluster, tmp_path,
                                                                        monkeypatch):
    from conftest import errors, open_page

    from engine.sweep import sweep_process_alive

    monkeypatch.setenv("LOSSATTN_RUNS", str(tmp_path))
    at = open_page("sweep", sw_train_size=64, sw_test_size=32, sw_epochs=2, sw_batch=32,
                   sw_gammas="0, 0.1", sw_xis="0.1", sw_name="onray", sw_ray=True,
                   sw_ray_address=cluster, sw_ray_cpus=THREADS)
    assert at.text_input(key="w_sw_ray_address").value == cluster
    at.button(key="sw_launch").click().run()
    assert not errors(at), errors(at)
    assert any("as tasks on the Ray cluster" in s.value for s in at.success)
    store = RunStore(tmp_path)
    deadline = time.monotonic() + 600
    while sweep_process_alive(store, "onray"):
        assert time.monotonic() < deadline, "the Ray sweep did not end"
        time.sleep(0.5)
    assert sweep_status(store, "onray").fields["executor"] == "ray"
    at.run()
    assert not at.exception and not errors(at)
    assert "2/2 runs finished" in at.get("progress")[0].proto.text
    assert sorted(at.dataframe[-1].value["loss.gamma_max"]) == [0, 0.1]
