"""The command line: model listing, the benchmark, and errors as messages (exit code 2)."""

import json
import subprocess
import sys

import pytest

from engine.cli import main


def test_models_lists_registries(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet18", "vgg11_bn", "small_cnn", "timm:<model name>", "loss_attention",
                 "capsule_loss_attention", "dynamic_routing", "plain"):
        assert name in out


def test_bench_reports_throughput_and_memory(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    code = main(["bench", "--models", "small_cnn/loss_attention,small_cnn/plain", "--batch", "8",
                 "--steps", "2", "--warmup", "1", "--device", "cpu", "--compare-fp32",
                 "--json", str(out_json)])
    assert code == 0
    table = capsys.readouterr().out
    assert "small_cnn/loss_attention" in table and "img/s" in table
    rows = json.loads(out_json.read_text())
    # On a CPU: the training default (channels_last), and with --compare-fp32 the contiguous
    # layout beside it.
    assert [(r["model"], r["mode"]) for r in rows] == [
        (model, mode) for model in ("small_cnn/loss_attention", "small_cnn/plain")
        for mode in ("fp32 channels_last", "fp32 eager")]
    for row in rows:
        assert row["images_per_s"] > 0 and row["step_ms"] > 0 and row["peak_mem_mb"] >= 0
        assert row["batch"] == 8


def test_errors_are_messages_not_tracebacks(capsys):
    assert main(["bench", "--models", "resnet19/loss_attention"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.backbone must be one of") and "Traceback" not in err
    assert main(["bench", "--models", "small_cnn"]) == 2
    assert "BACKBONE/HEAD" in capsys.readouterr().err
    assert main(["bench", "--batch", "0"]) == 2
    assert main(["bench", "--device", "tpu"]) == 2
    assert "device must be one of" in capsys.readouterr().err


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "engine", "models"], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0 and "loss_attention" in proc.stdout


def test_bench_train_reports_loader_model_and_step_rates(tmp_path, capsys):
    out = tmp_path / "bt.json"
    assert main(["bench-train", "--steps", "2", "--batch", "16", "--device", "cpu",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    for key in ("loader_images_per_s", "model_images_per_s", "train_step_images_per_s"):
        assert result[key] > 0 and key in printed
    # Loading a batch is cheaper than training on it: the figure must tell them apart.
    assert result["loader_images_per_s"] > result["train_step_images_per_s"]


def test_explain_writes_the_explorers_picture_weights_and_prediction(tmp_path, capsys):
    """An odd-sized RGBA file, read as the app reads an upload: the JSON's prediction and kept
    patches are those of the app's path (single_image_cache + decode) for the same image."""
    import csv
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image

    from engine.checkpoint import load_model
    from engine.data.base import ImageSet
    from engine.explore import decode, single_image_cache
    from engine.inputs import image_from_bytes

    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_small_cnn_la.pt"
    picture = tmp_path / "mine.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 4), dtype=np.uint8), "RGBA").save(picture)
    out = tmp_path / "out"
    assert main(["explain", str(shipped), str(picture), "--xi", "0.2", "--method", "gradcam",
                 "--method", "loss_attention", "--out", str(out)]) == 0
    assert "mine.png: " in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "mine-gradcam.png", "mine-loss_attention.png", "mine-weights.csv", "mine.json"]
    report = json.loads((out / "mine.json").read_text())
    model, ckpt = load_model(shipped)
    model.eval()
    pixels = image_from_bytes(picture.read_bytes(), (32, 32), "mine.png", "squash")
    from engine.data.digits import MEAN, STD

    data = ImageSet("digits", "x", pixels[None], torch.zeros(1, dtype=torch.long),
                    ckpt["classes"], False, MEAN, STD)
    app = decode(model, single_image_cache(model, pixels, data), 0.2)
    assert report["predicted"] == ckpt["classes"][int(app.logits[0].argmax())]
    assert report["kept_patches"] == (app.patch_weights[0] > 0).nonzero().flatten().tolist()
    assert report["xi"] == 0.2 and report["eq5"]["exact"]
    rows = list(csv.DictReader((out / "mine-weights.csv").open()))
    assert len(rows) == 36 and sum(float(r["weight"]) for r in rows) == pytest.approx(1, abs=1e-5)
    assert Image.open(out / "mine-loss_attention.png").size == (320, 320)
    # errors are one clear line each
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["explain", str(shipped), str(bad), "--out", str(out)]) == 2
    assert "notes.png is not an image this program can read" in capsys.readouterr().err
    assert main(["explain", str(shipped), str(picture), "--class", "cat", "--out", str(out)]) == 2
    assert "--class 'cat' is not one of the model's classes" in capsys.readouterr().err
    assert main(["explain", str(shipped), str(picture), "--xi", "2", "--out", str(out)]) == 2
    assert "--xi must lie in [0, 1]" in capsys.readouterr().err
