"""Checkpoints carry a checksum (issue 30): a damaged file is refused instead of computing
nonsense, non-finite weights are refused by name, older files still load with a note, and a
FIFO or device named like a checkpoint is refused at once."""

import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from engine.checkpoint import (
    CHECKSUM_KEY,
    NOTE_KEY,
    ORIGIN_KEY,
    CheckpointError,
    atomic_torch_save,
    checkpoint_checksum,
    load_checkpoint,
    load_model,
    make_checkpoint,
)
from engine.config import ModelConfig, RunConfig, config_to_dict
from engine.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "digits_small_cnn_la.pt"
KNOWN = "head.patches.conv5.weight"  # the largest tensor: its bytes are easy to find in a file


def _raw(path: Path) -> dict:
    """The file's dict exactly as torch reads it, with no checks of ours."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _trained_checkpoint(path: Path) -> dict:
    """A small model after one SGD step (so the optimizer holds momentum tensors), saved the
    way training saves ``last.pt``; returns the dict that was saved."""
    model = build_model(ModelConfig(backbone="small_cnn"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    optimizer.step()
    run = RunConfig(model=model.config)
    ckpt = make_checkpoint(config_to_dict(run), model, [optimizer.state_dict()],
                           rng={"torch": torch.get_rng_state()}, metrics={"test_acc": 0.5})
    atomic_torch_save(ckpt, path)
    return ckpt


def _load_in_thread(path: Path, seconds: float = 10.0) -> BaseException | None:
    """What :func:`load_checkpoint` raised on ``path``; fails the test if it is still reading
    after ``seconds`` (a FIFO would block a plain open forever)."""
    outcome: list = []

    def target():
        try:
            load_checkpoint(path)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test to judge
            outcome.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"loading {path} still blocks after {seconds} s"
    return outcome[0]


# ----------------------------------------------------------------------------------------------
# The checksum


def test_checksum_has_a_known_value_and_ignores_key_order_but_not_dtype():
    ckpt = {"format": "f", "model": {"w": torch.arange(4, dtype=torch.float16).reshape(2, 2),
                                     "n": torch.tensor(3)}, "metrics": {"acc": 0.5}}
    known = "sha256:c22342d1e8d828498dd5fc80a0ca8cb0d4e12e7b063cb2fbbbb3cf2dd0149e5f"
    assert checkpoint_checksum(ckpt) == known
    reordered = {"metrics": {"acc": 0.5}, "model": dict(reversed(ckpt["model"].items())),
                 "format": "f"}
    assert checkpoint_checksum(reordered) == known
    assert checkpoint_checksum({**ckpt, CHECKSUM_KEY: "x", NOTE_KEY: "y"}) == known
    # the same bytes read as bfloat16 are other numbers: another checksum
    as_bf16 = {**ckpt, "model": {**ckpt["model"], "w": ckpt["model"]["w"].view(torch.bfloat16)}}
    assert checkpoint_checksum(as_bf16) != known
    as_view = {**ckpt, "model": {**ckpt["model"], "w": ckpt["model"]["w"].t().contiguous().t()}}
    assert checkpoint_checksum(as_view) == known  # memory layout does not matter, values do
    assert checkpoint_checksum({**ckpt, "metrics": {"acc": 0.51}}) != known


def test_saved_checkpoint_round_trips_and_verifies(tmp_path, caplog):
    path = tmp_path / "last.pt"
    saved = _trained_checkpoint(path)
    assert CHECKSUM_KEY not in saved  # the caller's dict is left as it was
    raw = _raw(path)
    assert raw[CHECKSUM_KEY].startswith("sha256:") and len(raw[CHECKSUM_KEY]) == 7 + 64
    with caplog.at_level(logging.WARNING, logger="engine"):
        loaded = load_checkpoint(path)
    assert not caplog.records and NOTE_KEY not in loaded
    assert loaded[CHECKSUM_KEY] == checkpoint_checksum(saved) == checkpoint_checksum(loaded)
    [entry] = loaded["peers"]  # a single model: a team of one
    for key, value in saved["peers"][0]["model"].items():
        assert entry["model"][key].dtype == value.dtype and torch.equal(entry["model"][key],
                                                                        value)
    momentum = [s["momentum_buffer"] for s in entry["optimizer"]["state"].values()]
    assert momentum and all(m.abs().sum() > 0 for m in momentum)
    model, ckpt = load_model(path)
    assert NOTE_KEY not in ckpt and model.config.backbone == "small_cnn"


# ----------------------------------------------------------------------------------------------
# Damage


def test_flipped_bytes_inside_a_weight_are_a_checksum_mismatch(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(SHIPPED.read_bytes())
    weight = _raw(SHIPPED)["model"][KNOWN]
    data = bytearray(path.read_bytes())
    start = bytes(data).find(weight.numpy().tobytes())
    assert start > 0
    middle = start + weight.numel() * weight.element_size() // 2
    data[middle:middle + 256] = bytes(b ^ 0xFF for b in data[middle:middle + 256])
    path.write_bytes(bytes(data))
    damaged = _raw(path)  # torch alone reads it without a word (it checks no CRC)
    assert not torch.equal(damaged["model"][KNOWN], weight)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"checkpoint {path} is damaged (checksum mismatch)"
    assert path.read_bytes() == bytes(data)  # a refused load writes nothing


def test_a_changed_weight_or_metric_under_the_old_checksum_is_a_mismatch(tmp_path):
    ckpt = _raw(SHIPPED)
    weights = {**ckpt["model"], "head.fc.bias": ckpt["model"]["head.fc.bias"] + 1e-3}
    torch.save({**ckpt, "model": weights}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"w\.pt is damaged \(checksum mismatch\)"):
        load_checkpoint(tmp_path / "w.pt")
    torch.save({**ckpt, "metrics": {**ckpt["metrics"], "test_acc": 1.0}}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"m\.pt is damaged \(checksum mismatch\)"):
        load_checkpoint(tmp_path / "m.pt")
    torch.save({**ckpt, CHECKSUM_KEY: 12}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"c\.pt is damaged \(checksum mismatch\)"):
        load_checkpoint(tmp_path / "c.pt")


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_weights_are_refused_by_name(bad, tmp_path):
    ckpt = _raw(SHIPPED)
    weight = ckpt["model"]["head.fc.weight"].clone()
    weight[3, 7] = bad
    path = tmp_path / "inf.pt"
    atomic_torch_save({**ckpt, "model": {**ckpt["model"], "head.fc.weight": weight}}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert str(info.value) == (f"checkpoint {path} holds non-finite values in head.fc.weight; "
                               "refused")
    assert path.read_bytes() == before
    # a file from before checksums is refused the same way
    old = {key: value for key, value in _raw(path).items() if key != CHECKSUM_KEY}
    torch.save(old, path)
    with pytest.raises(CheckpointError, match="non-finite values in head.fc.weight; refused"):
        load_checkpoint(path)


def test_a_peers_non_finite_weights_are_refused_naming_the_peer(tmp_path):
    ckpt = _raw(SHIPPED)
    peer = {**ckpt["model"], "head.fc.bias": torch.full((10,), float("nan"))}
    atomic_torch_save({**ckpt, "peers": [{"model": peer}]}, tmp_path / "team.pt")
    with pytest.raises(CheckpointError, match=r"in head\.fc\.bias \(peer 1\); refused"):
        load_checkpoint(tmp_path / "team.pt")  # the previous version's mutual layout
    team = {key: v for key, v in ckpt.items() if key != "model"}
    atomic_torch_save({**team, "version": 2, "peers": [{"model": ckpt["model"]}, {"model": peer}]},
                      tmp_path / "team2.pt")
    with pytest.raises(CheckpointError, match=r"in head\.fc\.bias \(peer 1\); refused"):
        load_checkpoint(tmp_path / "team2.pt")  # this version's layout


# ----------------------------------------------------------------------------------------------
# Older checkpoints, shipped checkpoints


def test_checkpoint_without_checksum_loads_with_a_note(tmp_path, caplog):
    old = {key: value for key, value in _raw(SHIPPED).items() if key != CHECKSUM_KEY}
    path = tmp_path / "old.pt"
    torch.save(old, path)
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="engine"):
        model, ckpt = load_model(path)
    note = ckpt[NOTE_KEY]
    assert str(path) in note and "no checksum" in note and "could not be verified" in note
    assert [r.getMessage() for r in caplog.records] == [note]
    assert path.read_bytes() == before  # the note is never written back
    for key, value in old["model"].items():
        assert torch.equal(model.state_dict()[key], value)
    # saved again (an export of an old run), it gets a checksum, but never passes for verified
    atomic_torch_save(ckpt, tmp_path / "again.pt")
    raw = _raw(tmp_path / "again.pt")
    assert NOTE_KEY not in raw and CHECKSUM_KEY in raw and raw[ORIGIN_KEY] == note
    again = load_checkpoint(tmp_path / "again.pt")
    assert again[NOTE_KEY] == (f"checkpoint {tmp_path / 'again.pt'} was saved from an "
                               f"unverified one ({note})")
    atomic_torch_save(again, tmp_path / "third.pt")  # and so does every later copy
    assert _raw(tmp_path / "third.pt")[ORIGIN_KEY] == note


def test_the_explorer_says_a_checkpoint_is_unverified(tmp_path, monkeypatch):
    from conftest import open_page

    runs = tmp_path / "runs"
    folder = runs / "old-run"
    (folder / "checkpoints").mkdir(parents=True)
    old = {key: value for key, value in _raw(SHIPPED).items() if key != CHECKSUM_KEY}
    torch.save(old, folder / "checkpoints" / "best.pt")
    (folder / "config.json").write_text(json.dumps({**old["run_config"], "name": "old-run"}))
    (folder / "status.json").write_text(json.dumps({"state": "finished"}))
    monkeypatch.setenv("LOSSATTN_RUNS", str(runs))
    at = open_page("explorer", model_source="run: old-run")
    assert any(c.value.startswith("Unverified: checkpoint") and "no checksum" in c.value
               for c in at.caption)
    verified = open_page("explorer")  # a shipped model: no such line
    assert not any(c.value.startswith("Unverified") for c in verified.caption)


@pytest.mark.parametrize("path", sorted((ROOT / "checkpoints").glob("*.pt")), ids=lambda p: p.name)
def test_shipped_checkpoints_carry_a_checksum_that_verifies(path, caplog):
    with caplog.at_level(logging.WARNING, logger="engine"):
        ckpt = load_checkpoint(path)
    assert not caplog.records and NOTE_KEY not in ckpt
    assert _raw(path)[CHECKSUM_KEY] == checkpoint_checksum(ckpt)


# ----------------------------------------------------------------------------------------------
# Files that are not files


def test_a_fifo_named_like_a_checkpoint_is_refused_at_once(tmp_path):
    path = tmp_path / "best.pt"
    os.mkfifo(path)
    exc = _load_in_thread(path)
    assert isinstance(exc, CheckpointError)
    assert str(path) in str(exc) and "FIFO" in str(exc) and "checkpoint" in str(exc)


def test_a_link_to_dev_zero_named_like_a_checkpoint_is_refused_at_once(tmp_path):
    path = tmp_path / "best.pt"
    path.symlink_to("/dev/zero")
    exc = _load_in_thread(path)
    assert isinstance(exc, CheckpointError)
    assert str(path) in str(exc) and "character device" in str(exc)


def test_a_missing_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint .*gone\.pt does not exist"):
        load_checkpoint(tmp_path / "gone.pt")
