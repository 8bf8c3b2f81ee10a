"""The shipped default model: small, loads safely, and is as accurate as its card says."""

from pathlib import Path

import torch

from engine.checkpoint import load_model
from engine.config import DataConfig, config_from_dict
from engine.data import load_split
from engine.metrics import evaluate

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_small_cnn_la.pt"


def test_shipped_model_is_small_and_accurate():
    assert CHECKPOINT.stat().st_size < 5_000_000
    model, ckpt = load_model(CHECKPOINT)
    data_cfg = config_from_dict(DataConfig, ckpt["run_config"]["data"])
    assert data_cfg.dataset == "digits"
    test = load_split(data_cfg, "test")
    result = evaluate(model, test, torch.device("cpu"))
    assert result["test_acc"] >= 0.95
    assert abs(result["test_acc"] - ckpt["metrics"]["test_acc"]) < 1e-6  # the card's number
    assert model.config.head == "loss_attention" and 1 <= result["patches_selected"] < 36
    card = CHECKPOINT.with_suffix(".md").read_text()
    assert f"{ckpt['metrics']['test_acc']:.4f}" in card and "python -m engine train" in card
