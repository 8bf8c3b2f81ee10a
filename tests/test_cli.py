"""The command line: model listing, the benchmark, and errors as messages (exit code 2)."""

import json
import subprocess
import sys

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
                          text=True, timeout=120, check=False)
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
