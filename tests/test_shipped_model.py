"""The shipped default model: small, loads safely, and is as accurate as its card says."""

from pathlib import Path

import torch

from engine.checkpoint import load_model
from engine.config import DataConfig, config_from_dict
from engine.data import load_split
from engine.data.base import model_input
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


def test_bf16_keeps_the_shipped_models_selected_patches():
    """The condition for offering bf16 autocast on CPUs with native bf16 (train.amp): on the
    shipped model at ξ = 0.1, bf16 changes which patches are selected on at most 0.5 % of
    them, and the prediction of at most 1 % of the images. Run here whatever the CPU (where
    bf16 is emulated it is slow, but computes the same numbers)."""
    model, ckpt = load_model(CHECKPOINT)
    test = load_split(config_from_dict(DataConfig, ckpt["run_config"]["data"]), "test")
    x = model_input(test, test.images[:256])
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x)
    changed = ((fp32.patch_weights > 0) != (bf16.patch_weights > 0)).float().mean().item()
    assert changed <= 0.005, f"{changed:.2%} of patches change selection under bf16"
    flips = (fp32.logits.argmax(1) != bf16.logits.argmax(1)).float().mean().item()
    assert flips <= 0.01, f"{flips:.2%} of predictions change under bf16"
