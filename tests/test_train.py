"""Training runs: the run directory, stop / resume / kill, NaN losses, DDP, and bad input."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import launch as background
from engine.checkpoint import CheckpointError, load_checkpoint, load_model, load_state, peer_state
from engine.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from engine.models import build_model
from engine.recipes import RECIPES, lr_at
from engine.runs import RunError, RunStore
from engine.train import prepare_run_config, train_run

ROOT = Path(__file__).resolve().parents[1]


def small_config(name, epochs=2, **train):
    return RunConfig(name=name, model=ModelConfig(backbone="small_cnn"),
                     data=DataConfig(train_size=384, test_size=64),
                     train=TrainConfig(epochs=epochs, batch_size=64, **train))


def create(store, name, **kwargs):
    return store.create(prepare_run_config(small_config(name, **kwargs)))


def weights(path):
    return peer_state(load_checkpoint(path))


def assert_same_weights(a, b):
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


def wait_for(run, predicate, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run.status()
        if predicate(status):
            return status
        time.sleep(0.02)
    raise TimeoutError(f"{run.name}: condition not reached; status {run.status()}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run that interrupted runs must reproduce exactly."""
    store = RunStore(tmp_path_factory.mktemp("runs"))
    run = create(store, "reference", epochs=3)
    assert train_run(run, progress_bar=False) == "finished"
    return run


def test_run_directory_contents(reference, tmp_path):
    rows = reference.metrics()
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for key in ("train_loss", "test_loss", "test_acc", "lr", "patch_weight", "epoch_s",
                "images_per_s", "patches_selected"):
        assert key in rows[0], key
    assert rows[0]["patch_weight"] == 0.0 and rows[2]["patch_weight"] == pytest.approx(0.1)
    status = reference.status()
    assert status.state == "finished" and status.fields["epochs_done"] == 3
    assert status.fields["best_metric"] == max(r["test_acc"] for r in rows)
    config = reference.config()
    assert config.model.num_classes == 10 and config.loss.ramp_epochs == 1
    assert config.train.recipe == "sgd" and config.train.lr == 0.1
    model, ckpt = load_model(reference.best_checkpoint)
    assert ckpt["classes"] == [str(d) for d in range(10)] and not model.training
    assert "optimizer" in load_checkpoint(reference.last_checkpoint)["peers"][0]
    assert [r["name"] for r in RunStore(reference.path.parent).list()] == ["reference"]


def test_stop_and_resume_continue_the_same_curves(reference, tmp_path):
    store = RunStore(tmp_path)
    run = background.launch(store, small_config("stopped", epochs=3))
    wait_for(run, lambda s: len(run.metrics()) >= 1)  # stop somewhere after epoch 0
    assert store.stop(run.name)
    status = background.wait(run, timeout=600)
    assert status.state == "stopped", status
    assert not run.stop_path.exists()  # handled, so it cannot stop the resumed process
    assert 1 <= len(run.metrics()) < 3
    with pytest.raises(RunError, match="use resume"):
        train_run(run, progress_bar=False)
    assert train_run(run, resume=True, progress_bar=False) == "finished"
    assert_same_weights(weights(reference.last_checkpoint), weights(run.last_checkpoint))
    assert [r["train_loss"] for r in run.metrics()] == [r["train_loss"]
                                                        for r in reference.metrics()]


def test_sigkill_mid_epoch_resumes_from_last_checkpoint(reference, tmp_path):
    store = RunStore(tmp_path)
    run = background.launch(store, small_config("killed", epochs=3))
    # The epoch's metrics line is written before its checkpoint (a kill in between redoes it).
    wait_for(run, lambda s: len(run.metrics()) >= 1 and run.last_checkpoint.exists())
    os.kill(run.job.process().pid, signal.SIGSTOP)  # freeze it to read what a kill leaves
    saved = run.last_checkpoint.read_bytes()
    os.kill(run.job.process().pid, signal.SIGKILL)
    status = wait_for(run, lambda s: s.state != "running")
    assert status.state == "failed" and "ended unexpectedly" in status.reason
    assert run.last_checkpoint.read_bytes() == saved  # nothing older is lost or corrupted
    load_checkpoint(run.last_checkpoint)
    assert [r["name"] for r in store.list()] == ["killed"]
    assert store.list()[0]["state"] == "failed"
    assert train_run(run, resume=True, progress_bar=False) == "finished"
    assert_same_weights(weights(reference.last_checkpoint), weights(run.last_checkpoint))
    assert len(run.metrics()) == 3


def test_mid_epoch_checkpoints_resume_exactly(reference, tmp_path, monkeypatch):
    from engine import train

    store = RunStore(tmp_path)
    run = create(store, "often", epochs=3, checkpoint_minutes=1e-6)  # a checkpoint every step
    saved_steps = []
    real_save = train.atomic_torch_save

    def save(obj, path):
        real_save(obj, path)
        if path.name == "last.pt":
            saved_steps.append((obj["progress"]["epoch"], obj["progress"]["step"]))
            if saved_steps[-1] == (1, 2):  # stop here, as a kill would
                raise KeyboardInterrupt

    monkeypatch.setattr(train, "atomic_torch_save", save)
    with pytest.raises(KeyboardInterrupt):
        train_run(run, progress_bar=False)
    assert saved_steps[:7] == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 0), (1, 1)]
    assert load_checkpoint(run.last_checkpoint)["progress"]["step"] == 2
    monkeypatch.setattr(train, "atomic_torch_save", real_save)
    run.update_status(state="failed")  # what status() reports once the process is gone
    assert train_run(run, resume=True, progress_bar=False) == "finished"
    assert_same_weights(weights(reference.last_checkpoint), weights(run.last_checkpoint))


def test_nan_loss_fails_the_run_and_keeps_checkpoints(tmp_path, monkeypatch):
    from engine import losses

    store = RunStore(tmp_path)
    run = create(store, "nan", epochs=3)
    calls = {"n": 0}
    real = losses.single_label_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] > 8:  # epoch 0 has 6 steps; break in epoch 1
            return terms._replace(total=terms.total * float("nan"))
        return terms

    monkeypatch.setattr(losses, "single_label_loss", poisoned)
    assert train_run(run, progress_bar=False) == "failed"
    status = run.status()
    assert status.state == "failed" and "non-finite" in status.reason
    assert load_checkpoint(run.last_checkpoint)["progress"]["epoch"] == 1  # epoch 0's, intact
    assert len(run.metrics()) == 1


def test_refusals_leave_runs_untouched(reference, tmp_path):
    store = RunStore(reference.path.parent)
    before = reference.status_path.read_text()
    with pytest.raises(RunError, match="finished"):
        train_run(reference, resume=True, progress_bar=False)
    with pytest.raises(RunError, match="finished"):
        background.resume(store, "reference")
    assert reference.status_path.read_text() == before
    with pytest.raises(RunError, match="already exists"):
        store.create(small_config("reference"))
    with pytest.raises(ConfigError, match="name"):
        small_config("../x")
    with pytest.raises(RunError, match="invalid run name"):
        store.get("../x")
    with pytest.raises(RunError, match="no run named"):
        store.get("missing")


def test_checkpoint_errors(reference, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(reference.best_checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a checkpoint of this project.*damaged"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save(build_model(ModelConfig(backbone="small_cnn")).state_dict(), foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(foreign)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "loss-attention-studio/checkpoint", "obj": Path("x")}, unsafe)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project") as info:
        load_checkpoint(unsafe)
    assert "weights_only" not in str(info.value)  # never advice to load it unsafely
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    other = build_model(ModelConfig(backbone="small_cnn", head="attention", num_classes=10))
    with pytest.raises(CheckpointError, match="another architecture.*head"):
        load_state(other, load_checkpoint(reference.best_checkpoint))


def test_index_is_a_rebuildable_cache(reference, tmp_path):
    store = RunStore(reference.path.parent)
    assert store.index_path.name == ".index.sqlite"  # outside the run namespace
    store.index_path.write_bytes(b"this is not sqlite")
    for suffix in ("-wal", "-shm"):
        Path(f"{store.index_path}{suffix}").unlink(missing_ok=True)
    assert [r["name"] for r in store.list()] == ["reference"]
    store.index_path.unlink()
    assert store.rebuild_index() == 1 and store.list()[0]["state"] == "finished"


def test_delete_run(tmp_path):
    store = RunStore(tmp_path)
    run = create(store, "gone", epochs=1)
    store.delete("gone")
    assert not run.path.exists() and store.list() == []


def test_lr_recipes():
    sgd = TrainConfig(epochs=200, recipe="sgd", lr=0.1)
    assert [lr_at(e, sgd) for e in (0, 99, 100, 149, 150)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001])
    adam = TrainConfig(epochs=200, recipe="adam", lr=0.003)
    assert lr_at(0, adam) == pytest.approx(2.02138e-05, rel=1e-5)  # 0.003 e^-5, by hand
    assert lr_at(40, adam) == pytest.approx(8.59514e-04, rel=1e-5)  # 0.003 e^-1.25
    assert [lr_at(e, adam) for e in (80, 119, 120, 160)] == pytest.approx(
        [0.003, 0.003, 0.0003, 0.00003])


def test_onecycle_moves_every_step_and_the_paper_recipes_only_per_epoch():
    """Known answers by hand: peak 0.2, 10 epochs, warm-up over 20 % (2 epochs) from 0.02."""
    one = TrainConfig(epochs=10, recipe="onecycle", lr=0.2)
    assert [lr_at(t, one) for t in (0.0, 1.0, 2.0, 6.0, 10.0)] == pytest.approx(
        [0.02, 0.11, 0.2, 0.1, 0.0])
    assert lr_at(0.5, one) == pytest.approx(0.02 + 0.18 * 0.25)  # within an epoch
    sgd = TrainConfig(epochs=4, recipe="sgd", lr=0.1)
    assert lr_at(1.99, sgd) == lr_at(1.0, sgd) == 0.1 and lr_at(2.0, sgd) == pytest.approx(0.01)


def test_eval_sample_evaluates_the_last_epoch_on_the_whole_set(tmp_path):
    """Epochs before the last on the sample; best.pt from the whole-set evaluation, which
    replaces a sample's best whatever the numbers (they are not comparable)."""
    store = RunStore(tmp_path)
    run = store.create(prepare_run_config(small_config("sampled", epochs=2, eval_sample=16)))
    assert train_run(run, progress_bar=False) == "finished"
    rows = run.metrics()
    assert [r["eval_images"] for r in rows] == [16, 64]
    status = run.status()
    assert status.fields["best_epoch"] == 1 and status.fields["best_metric"] == rows[1]["test_acc"]
    assert load_checkpoint(run.best_checkpoint)["metrics"]["eval_images"] == 64


def test_the_best_rule_prefers_a_whole_set_evaluation():
    from engine.train import Progress, _beats_best

    sample_best = Progress(best_metric=0.9, best_whole=False)
    assert _beats_best(sample_best, 0.5, whole=True)  # whole set beats any sample
    assert not _beats_best(Progress(best_metric=0.5, best_whole=True), 0.9, whole=False)
    assert _beats_best(sample_best, 0.95, whole=False) and not _beats_best(
        sample_best, 0.85, whole=False)
    assert _beats_best(Progress(), 0.1, whole=False)


def test_every_recipe_name_a_config_accepts_has_a_recipe():
    from engine.config import RECIPE_NAMES

    assert sorted(RECIPES) == sorted(RECIPE_NAMES)


@pytest.mark.parametrize("head, recipe, lr, weight_decay", [
    ("loss_attention", "sgd", 0.1, 5e-4), ("capsule_loss_attention", "sgd", 0.1, 5e-4),
    ("attention", "sgd", 0.1, 5e-4), ("gated_attention", "sgd", 0.1, 5e-4),
    ("plain", "sgd", 0.1, 5e-4), ("mean", "adam", 0.003, 0.0),
    ("dynamic_routing", "adam", 0.003, 0.0)])
def test_auto_recipe_is_the_papers_for_each_head(head, recipe, lr, weight_decay):
    """The paper trains Mean-pooling and Dynamic Routing with Adam, the others with SGD."""
    cfg = prepare_run_config(RunConfig(
        model=ModelConfig(backbone="small_cnn", head=head), data=DataConfig(test_size=32),
        train=TrainConfig(epochs=2)))
    assert (cfg.train.recipe, cfg.train.lr, cfg.train.weight_decay) == (recipe, lr, weight_decay)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_equals_one_process_with_micro_batches(tmp_path, name: str, args: list[str]):
    """Run ``single``: the same run in one process with 2 micro-batches; its weights must equal
    those of the 2-rank run ``name`` (BatchNorm's running statistics aside)."""
    single = subprocess.run([sys.executable, "-m", "engine", "train", "--name", "single",
                             "--micro-batches", "2", *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    a = weights(tmp_path / name / "checkpoints/last.pt")
    b = weights(tmp_path / "single/checkpoints/last.pt")
    for key in a:
        if "running_" in key or "num_batches" in key:
            continue  # BN running stats: DDP keeps rank 0's, one process both micro-batches'
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


EXIT_PROBE = """
import atexit, logging, logging.handlers, sys
from engine.cli import exit_process
# Held in memory until the handlers are flushed and closed: only logging.shutdown writes it.
held = logging.handlers.MemoryHandler(100, logging.CRITICAL, logging.FileHandler(sys.argv[1]))
logging.getLogger().addHandler(held)
logging.getLogger().setLevel(logging.INFO)
logging.getLogger("probe").info("logged before the exit")
atexit.register(lambda: print("FINALIZED", flush=True))
print("printed before the exit", end="")
exit_process(3)
"""


@pytest.mark.parametrize("world", [None, "2"])
def test_a_torchrun_rank_ends_flushed_and_without_finalizing(tmp_path, world):
    """``python -m engine`` ends through exit_process: under torchrun (WORLD_SIZE > 1) with its
    code, its output and log flushed, and no interpreter finalization (where a gloo worker
    thread still dropping the last collective's work aborts the rank); otherwise as usual."""
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if world:
        env["WORLD_SIZE"] = world
    log = tmp_path / "probe.log"
    out = subprocess.run([sys.executable, "-c", EXIT_PROBE, str(log)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 3, out.stderr
    assert out.stdout.startswith("printed before the exit")
    assert "logged before the exit" in log.read_text()
    assert ("FINALIZED" in out.stdout) == (world is None)


def test_ddp_two_processes_equal_single_process(tmp_path):
    """torchrun with 2 gloo ranks == one process with 2 micro-batches (same data, same BN)."""
    args = ["--runs-dir", str(tmp_path), "--backbone", "small_cnn", "--epochs", "2",
            "--train-size", "256", "--test-size", "32", "--batch-size", "64", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "engine", "train",
                          "--name", "ddp", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    _assert_equals_one_process_with_micro_batches(tmp_path, "ddp", args)
    store = RunStore(tmp_path)
    rows = {name: store.get(name).metrics() for name in ("ddp", "single")}
    for x, y in zip(rows["ddp"], rows["single"], strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)


def _torchrun_node(tmp_path, port: int, rdzv_id: str, node: int, *command: str):
    """One simulated machine: a torchrun launcher of 1 process joining a 2-node c10d group."""
    log = (tmp_path / f"node-{rdzv_id}-{node}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
         "--monitor-interval", "0.5", "-m", "engine", *command],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)


def _node_log(tmp_path, rdzv_id: str, node: int) -> str:
    return (tmp_path / f"node-{rdzv_id}-{node}.log").read_text()[-3000:]


def _kill_node(launcher: subprocess.Popen) -> None:
    """A machine's death: its launcher and its workers (torchrun starts them in their own
    sessions, so killing the launcher's process group alone would leave them running)."""
    import psutil

    try:  # the launcher may end on its own between a poll and this kill
        launcher_proc = psutil.Process(launcher.pid)
        procs = [*launcher_proc.children(recursive=True), launcher_proc]
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    launcher.wait(timeout=30)


def _wait_for_nodes(nodes: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """The launchers' exit codes. Once one fails, the others are killed at once: torchrun's
    exit barrier would otherwise hold a healthy launcher for 300 s before it gives up."""
    deadline = time.monotonic() + timeout
    try:
        while any(n.poll() is None for n in nodes) and time.monotonic() < deadline:
            if any(n.poll() not in (None, 0) for n in nodes):
                break
            time.sleep(0.1)
    finally:
        for n in nodes:
            if n.poll() is None:
                _kill_node(n)
    return [n.returncode for n in nodes]


def test_a_failed_node_ends_the_wait_for_the_others_at_once():
    """What keeps a crashed rank from costing the two-node test torchrun's 300 s barrier."""
    failed = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    healthy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = time.monotonic()
    assert _wait_for_nodes([failed, healthy], timeout=600) == [3, -signal.SIGKILL]
    assert time.monotonic() - start < 10


def test_two_nodes_equal_one_process_and_a_lost_node_fails_the_run_then_it_resumes(tmp_path):
    """Two torchrun launchers on localhost (one process each, gloo, c10d rendezvous) stand for
    two machines. Killing the node without rank 0 mid-run ends the run failed, with a reason;
    resumed by two launchers, it ends equal to one process with 2 micro-batches."""
    import psutil

    args = ["--runs-dir", str(tmp_path), "--backbone", "small_cnn", "--epochs", "8",
            "--train-size", "1024", "--test-size", "32", "--batch-size", "64", "--quiet"]
    port = _free_port()
    nodes = [_torchrun_node(tmp_path, port, "first", k, "train", "--name", "mn", *args)
             for k in range(2)]
    store = RunStore(tmp_path)
    try:
        deadline = time.monotonic() + 600
        while not ((tmp_path / "mn/status.json").is_file()
                   and store.get("mn").status().fields.get("epochs_done", 0) >= 1):
            assert time.monotonic() < deadline, _node_log(tmp_path, "first", 0)
            assert all(n.poll() is None for n in nodes), _node_log(tmp_path, "first", 0)
            time.sleep(0.02)
        rank0 = psutil.Process(store.get("mn").raw_status().process.pid)
        victim = next(n for n in nodes if n.pid not in {p.pid for p in rank0.parents()})
        _kill_node(victim)
        survivor = next(n for n in nodes if n is not victim)
        assert survivor.wait(timeout=600) != 0
    finally:
        for n in nodes:
            if n.poll() is None:
                _kill_node(n)
    status = store.get("mn").status()
    assert status.state == "failed", status
    assert 1 <= status.fields["epochs_done"] < 8
    assert "lost contact with the other ranks of the 2-process group" in status.reason

    port = _free_port()
    nodes = [_torchrun_node(tmp_path, port, "second", k, "resume", "mn", "--runs-dir",
                            str(tmp_path), "--quiet") for k in range(2)]
    codes = _wait_for_nodes(nodes, timeout=300)
    assert codes == [0, 0], _node_log(tmp_path, "second", 0) + _node_log(tmp_path, "second", 1)
    assert store.get("mn").status().state == "finished"
    log_text = store.get("mn").log_path.read_text()
    assert f"resumed mn at epoch {status.fields['epochs_done']} step 0" in log_text
    _assert_equals_one_process_with_micro_batches(tmp_path, "mn", args)


def test_cli_train_resume_and_runs(tmp_path):
    from engine.cli import main

    common = ["--runs-dir", str(tmp_path)]
    assert main(["train", *common, "--name", "cli", "--backbone", "small_cnn", "--epochs", "1",
                 "--train-size", "64", "--test-size", "16", "--quiet",
                 "--set", "model.xi=0.5", "--tag", "demo"]) == 0
    run = RunStore(tmp_path).get("cli")
    assert run.config().model.xi == 0.5 and run.config().tags == ("demo",)
    assert main(["resume", *common, "cli", "--quiet"]) == 2  # finished: a message, exit 2
    assert main(["runs", "list", *common]) == 0
    assert main(["train", *common, "--name", "../evil"]) == 2
    assert main(["train", *common, "--set", "model.ksi=1"]) == 2
    assert main(["train", *common, "--dataset", "mnist"]) == 2
    assert main(["runs", "delete", *common, "cli"]) == 0


@pytest.mark.parametrize("dataset, head, metric", [
    ("digits_multilabel", "loss_attention", "test_map"),
    ("digits", "mean", "test_acc"),
    ("digits", "capsule_loss_attention", "test_acc"),
    ("digits", "plain", "test_acc"),
])
def test_other_data_and_heads_train(tmp_path, dataset, head, metric):
    store = RunStore(tmp_path)
    config = RunConfig(name="x", model=ModelConfig(backbone="small_cnn", head=head),
                       data=DataConfig(dataset=dataset, train_size=128, test_size=64),
                       train=TrainConfig(epochs=2, batch_size=32))
    run = store.create(prepare_run_config(config))
    assert run.config().loss.multilabel == (dataset == "digits_multilabel")
    assert run.config().train.recipe == ("adam" if head == "mean" else "sgd")
    assert train_run(run, progress_bar=False) == "finished"
    rows = run.metrics()
    assert len(rows) == 2 and 0.0 <= rows[-1][metric] <= 1.0
    assert ("patches_selected" in rows[-1]) == (head != "plain")


def test_export_writes_small_checkpoint_and_card(reference, tmp_path):
    from engine.export import export_model

    weights_path, card = export_model(reference, tmp_path / "model.pt")
    model, ckpt = load_model(weights_path)
    assert "optimizer" not in ckpt and ckpt["classes"][0] == "0"
    assert weights_path.stat().st_size < reference.last_checkpoint.stat().st_size
    text = card.read_text()
    assert "small_cnn" in text and "| test_acc (test accuracy) |" in text and "epochs" in text
    x = torch.zeros(1, 3, 32, 32)
    torch.testing.assert_close(model(x).logits, load_model(reference.best_checkpoint)[0](x).logits)
    # The card reports the explanation quality, measured on the run's test set at its ξ.
    from engine.data import load_split
    from engine.evaluate import evaluate_model

    data = load_split(reference.config().data, "test")
    row = evaluate_model(model.eval(), data, torch.device("cpu"), pr_curves=False)["by_xi"][0]
    assert f"| f_paper | {row['patch']['f_paper']:.4f} |" in text
    assert f"| gt_known_loc | {row['localization']['gt_known_loc']:.4f} |" in text
    assert f"Explanation quality on the {len(data):,} test images at ξ = 0.1" in text
    _, bare = export_model(reference, tmp_path / "bare.pt", evaluate=False)
    assert "Explanation quality" not in bare.read_text()


def test_crash_in_background_process_is_reported(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(folder / cls / f"{i}.png")
    store = RunStore(tmp_path / "runs")
    config = RunConfig(name="crash", model=ModelConfig(backbone="small_cnn"),
                       data=DataConfig(dataset="image_folder", root=str(folder), input_size=32),
                       train=TrainConfig(epochs=1, batch_size=4))
    run = store.create(prepare_run_config(config))
    for path in folder.rglob("*.png"):  # the data disappears before the run starts
        path.unlink()
    background.start(store, run)
    status = background.wait(run, timeout=600)
    assert status.state == "failed" and "no image files" in status.reason
