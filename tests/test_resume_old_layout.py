"""Runs and checkpoints of the previous version (issue 33): its checkpoint layouts and metrics
rows still load, and a run it started and stopped mid-epoch resumes to exactly the weights of
an uninterrupted run.

The previous version (checkpoint format version 1) wrote:

- a single model's checkpoint: ``model`` (the state dict) and, in ``last.pt``, ``optimizer`` at
  the top level;
- a mutual-transfer run's: peer 0 at the top level as above, peers 1.. under ``peers`` as
  ``{"model", "optimizer"}``; its ``peer{k}.pt`` were single-model checkpoints;
- the epoch's running sums (``progress.sums``) of a mutual run with suffixed keys per peer
  (``loss0``, ``correct1``, ...) beside the team's, and its metrics rows likewise
  (``peer0_test_acc``, ``peer1_train_loss``, ...).

:func:`old_checkpoint` and :func:`old_row` turn this version's files into exactly that form.
"""

import json

import pytest
import torch
from conftest import kill_mid_epoch

from engine.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    checkpoint_peers,
    load_checkpoint,
    load_model,
    peer_state,
)
from engine.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from engine.runs import RunStore
from engine.team import peer_rows
from engine.train import prepare_run_config, train_run

STATS = ("train_loss", "train_acc", "test_acc", "test_loss")
"""Per-peer statistics compared between runs (timings differ)."""


def old_row(row: dict) -> dict:
    """A metrics row as the previous version wrote it: each peer's values as ``peer{k}_...``."""
    if "peers" not in row:
        return dict(row)
    out = {key: value for key, value in row.items() if key != "peers"}
    out.update({f"peer{k}_{name}": value for k, own in enumerate(row["peers"])
                for name, value in own.items()})
    return out


def old_sums(sums: dict) -> dict:
    """Running sums as the previous version saved them: each peer's as ``{name}{k}``."""
    out = {key: value for key, value in sums.items() if key != "peers"}
    out.update({f"{name}{k}": value for k, own in enumerate(sums.get("peers", []))
                for name, value in own.items()})
    return out


def old_checkpoint(ckpt: dict) -> dict:
    """A checkpoint of this version in the previous version's layout (version 1)."""
    entries = ckpt["peers"]
    old = {key: value for key, value in ckpt.items() if key not in ("peers", "checksum")}
    old.update(version=1, **entries[0])  # peer 0 where a single model's checkpoint keeps it
    if len(entries) > 1:
        old["peers"] = entries[1:]
    if old.get("progress", {}).get("sums"):
        old["progress"] = {**old["progress"], "sums": old_sums(old["progress"]["sums"])}
    if "metrics" in old:
        old["metrics"] = old_row(old["metrics"])
    return old


def make_old(run) -> None:
    """Leave ``run``'s folder exactly as the previous version would have: its checkpoints in
    the old layout (with a checksum, as that version wrote them), its metrics rows in the old
    form, no per-peer status."""
    for path in run.checkpoint_dir.glob("*.pt"):
        atomic_torch_save(old_checkpoint(load_checkpoint(path)), path)
    rows = [old_row(r) for r in run.metrics()]
    run.metrics_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    status = json.loads(run.status_path.read_text())
    status.pop("peers", None)
    run.status_path.write_text(json.dumps(status))


def _config(name: str, mutual: bool) -> RunConfig:
    transfer = ({"peers": [{"backbone": "small_cnn", "head": "plain"}], "lam": 2.0}
                if mutual else None)
    return RunConfig(name=name, model=ModelConfig(backbone="small_cnn"),
                     data=DataConfig(train_size=256, test_size=64),
                     train=TrainConfig(epochs=2, batch_size=64), transfer=transfer)


def _stopped_mid_epoch(store: RunStore, name: str, mutual: bool, monkeypatch):
    """A run killed at epoch 1, step 2 (a checkpoint after every step)."""
    cfg = _config(name, mutual)
    cfg.train.checkpoint_minutes = 1e-6
    run = store.create(prepare_run_config(cfg))
    kill_mid_epoch(run, monkeypatch)
    return run


def _stats(rows: list[dict]) -> list[list[dict]]:
    return [[{k: v for k, v in own.items() if k in STATS} for own in peer_rows(r)] for r in rows]


@pytest.mark.parametrize("mutual", [False, True], ids=["single", "mutual"])
def test_a_run_stopped_by_the_previous_version_resumes_exactly(mutual, tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    reference = store.create(prepare_run_config(_config("reference", mutual)))
    assert train_run(reference, progress_bar=False) == "finished"
    run = _stopped_mid_epoch(store, "old", mutual, monkeypatch)
    make_old(run)
    last = load_checkpoint(run.last_checkpoint)
    assert last["version"] == 1 and isinstance(last["model"], dict) and "optimizer" in last
    if mutual:  # the old form really is there: suffixed sums and rows
        assert "loss1" in last["progress"]["sums"] and "peers" not in last["progress"]["sums"]
        assert "peer1_test_acc" in run.metrics()[0] and "peers" not in run.metrics()[0]

    assert train_run(run, resume=True, progress_bar=False) == "finished"

    a, b = load_checkpoint(reference.last_checkpoint), load_checkpoint(run.last_checkpoint)
    peers = 2 if mutual else 1
    assert len(checkpoint_peers(b)) == peers and b["version"] == 2
    for k in range(peers):
        for key, value in peer_state(a, k).items():
            torch.testing.assert_close(peer_state(b, k)[key], value, atol=0, rtol=0, msg=key)
    rows, expected = run.metrics(), reference.metrics()
    assert [r["epoch"] for r in rows] == [0, 1]
    assert _stats(rows) == _stats(expected)  # epoch 0 in the old form, epoch 1 in the new
    for key in ("train_loss", "train_acc", "test_acc", "train_transfer_loss"):
        assert [r.get(key) for r in rows] == [r.get(key) for r in expected], key
    # Every tool that opens the run's checkpoints sees peer 0 by default, any peer when asked.
    for k in range(peers):
        model, _ = load_model(run.best_checkpoint, peer=k)
        assert model.config.head == ("loss_attention", "plain")[k]
    if mutual:
        from engine.export import export_model

        standalone, _ = load_model(run.peer_checkpoint(1))
        assert standalone.config.head == "plain"
        weights, _ = export_model(run, tmp_path / "p1.pt", peer=1, evaluate=False)
        exported = load_checkpoint(weights)
        assert exported["version"] == 2 and len(exported["peers"]) == 1
        assert exported["metrics"]["test_acc"] == peer_rows(
            rows[exported["metrics"]["epoch"]])[1]["test_acc"]


# ----------------------------------------------------------------------------------------------
# The readers, on every form


def test_peer_rows_reads_every_form_of_a_metrics_row():
    new = {"epoch": 0, "test_acc": 0.5, "peers": [{"test_acc": 0.4}, {"test_acc": 0.6}]}
    old = {"epoch": 0, "test_acc": 0.5, "peer0_test_acc": 0.4, "peer1_test_acc": 0.6}
    single = {"epoch": 0, "test_acc": 0.5, "train_loss": 1.0}
    assert peer_rows(new) == peer_rows(old) == [{"test_acc": 0.4}, {"test_acc": 0.6}]
    assert peer_rows(single) == [single]
    assert peer_rows(old_row(new)) == peer_rows(new)


def _model_state(head: str) -> tuple[ModelConfig, dict]:
    from engine.models import build_model

    model = build_model(ModelConfig(backbone="small_cnn", head=head))
    return model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_checkpoint_peers_reads_every_layout(tmp_path):
    from engine.checkpoint import FORMAT
    from engine.config import config_to_dict

    (cfg0, s0), (cfg1, s1) = _model_state("loss_attention"), _model_state("plain")
    run = config_to_dict(RunConfig(model=cfg0, transfer={"peers": [config_to_dict(cfg1)]}))
    layouts = {
        "this version": {"format": FORMAT, "version": 2, "run_config": run,
                         "peers": [{"model": s0}, {"model": s1}]},
        "previous, mutual": {"format": FORMAT, "version": 1, "run_config": run, "model": s0,
                             "peers": [{"model": s1}]},
    }
    for name, ckpt in layouts.items():
        atomic_torch_save(ckpt, tmp_path / "c.pt")
        loaded = load_checkpoint(tmp_path / "c.pt")
        assert len(checkpoint_peers(loaded)) == 2, name
        for k, (head, state) in enumerate((("loss_attention", s0), ("plain", s1))):
            model, _ = load_model(tmp_path / "c.pt", peer=k)
            assert model.config.head == head, name
            assert all(torch.equal(model.state_dict()[key], v) for key, v in state.items())
        model, _ = load_model(tmp_path / "c.pt")  # peer 0 by default
        assert model.config.head == "loss_attention"
        with pytest.raises(CheckpointError, match="there is no peer 2"):
            peer_state(loaded, 2)
    single = config_to_dict(RunConfig(model=cfg1))
    atomic_torch_save({"format": FORMAT, "version": 1, "run_config": single, "model": s1},
                      tmp_path / "s.pt")
    assert [list(e) for e in checkpoint_peers(load_checkpoint(tmp_path / "s.pt"))] == [["model"]]
    for bad, words in (({"peers": []}, "lacks 'peers'"),
                       ({"peers": [{"model": s0}, {"weights": s1}]}, "peer 1 has no weights")):
        atomic_torch_save({"format": FORMAT, "version": 2, "run_config": run, **bad},
                          tmp_path / "b.pt")
        with pytest.raises(CheckpointError, match=words):
            load_checkpoint(tmp_path / "b.pt")
