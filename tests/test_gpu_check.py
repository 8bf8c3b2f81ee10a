"""``python -m engine gpu-check``: its arithmetic by known answers, and the whole check rehearsed
on the CPU (``--dry-run``), so that it is ready the day a GPU is present."""

import pytest
import torch
from conftest import needs_data

from engine import gpu_check as gc
from engine.cli import main
from engine.config import ModelConfig
from engine.models import build_model


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 70.0), ("Tesla T4", None),
])
def test_the_device_peak_comes_from_the_gpus_name(name, peak):
    assert gc.peak_tflops_of(name) == peak


def test_mfu_is_achieved_flops_over_the_peak():
    assert gc.model_flops_utilisation(2e12, 0.5, 8.0) == pytest.approx(0.5)


def test_step_flops_count_the_forward_and_the_backward_matmuls():
    layer = torch.nn.Linear(10, 20)
    x = torch.randn(4, 10)
    forward = 2 * 4 * 10 * 20
    # the weight's gradient is one more matmul of the forward's size; the input's is another
    assert gc.count_step_flops(layer, x, lambda out: out.sum()) == 2 * forward
    assert gc.count_step_flops(layer, x.requires_grad_(), lambda out: out.sum()) == 3 * forward
    assert all(p.grad is None for p in layer.parameters())  # the count leaves no gradients


def test_ieee_fp32_turns_tf32_off_inside_and_restores_it():
    from engine.device import ieee_fp32

    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with ieee_fp32():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_selection_flips_is_the_share_of_patches_that_changed():
    a = torch.zeros(4, 50, dtype=torch.bool)
    b = a.clone()
    b[2, 7] = True
    assert gc.selection_flips(a, b) == pytest.approx(1 / 200)
    assert gc.selection_flips(a, a) == 0.0


def test_bf16_agreement_of_fp32_with_itself_flips_nothing():
    """The control: without autocast only the memory layout differs between the two passes."""
    model = build_model(ModelConfig(backbone="small_cnn", head="loss_attention"))
    images = torch.randn(24, 3, 32, 32)
    r = gc.bf16_agreement(model, images, torch.device("cpu"), xi=0.1, amp=False, batch=10)
    assert r["patches"] == 24 * model.grid((32, 32)).num_patches
    assert r["selection_flips"] == 0.0 and r["top1_agree"] == 1.0
    assert r["logit_max_abs"] < 1e-4 and r["weight_max_abs"] < 1e-5


def test_a_section_that_raises_is_a_failed_row_and_the_others_still_run(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel image is available")

    def measured(plan, device, report, echo):
        report.add(gc.Row("throughput", "stand-in", "1 img/s"))

    monkeypatch.setattr(gc, "train_checks", broken)
    monkeypatch.setattr(gc, "throughput_rows", measured)
    report = gc.run_gpu_check(gc.Plan.rehearsal(), torch.device("cpu"))
    assert [r.section for r in report.rows] == ["training", "throughput", "total"]
    assert report.failed == report.rows[:1]
    assert "RuntimeError: no kernel image is available" in report.failed[0].value
    assert "1 target(s) missed: training section" in gc.format_report(report)


@needs_data  # the CIFAR-10 slice
def test_the_dry_run_takes_every_path_and_passes_every_correctness_check(tmp_path):
    lines = []
    report = gc.run_gpu_check(gc.Plan.rehearsal(peak_tflops=1.0), torch.device("cpu"),
                              echo=lines.append, workdir=tmp_path)
    by_section = {}
    for row in report.rows:
        by_section.setdefault(row.section, []).append(row)
    assert not report.failed, gc.format_report(report)
    assert [r.met for r in by_section["training"]] == [True, True]
    assert all("finished" in r.value for r in by_section["training"])
    assert by_section["bf16 vs fp32"][-1].met is True  # selected patches: <= 0.5 % flipped
    assert [r.met for r in by_section["evaluation"] + by_section["explorer"]] == [True, True]
    modes = ("fp32 eager (IEEE)", "bf16+channels_last")
    assert [r.check for r in by_section["throughput"]] == [
        f"{s}x{s} b4 {m}" for s in (32, 64) for m in modes]
    assert all("img/s" in r.value and "MB peak" in r.value for r in by_section["throughput"])
    assert len(by_section["speed-up"]) == 2 and len(by_section["MFU"]) == 6
    # measured against the given peak; speed targets are the GPU's, so not judged in a rehearsal
    mfu = [r for r in by_section["MFU"] if "best" not in r.check]
    assert len(mfu) == 4 and all("% of 1 TFLOPS" in r.value for r in mfu)
    assert all(r.met is None for r in by_section["MFU"] + by_section["speed-up"])
    assert by_section["total"][0].target == "<= 480 s" and by_section["total"][0].met is None
    assert len([line for line in lines if not line.startswith("  (")]) == len(report.rows)
    table = gc.format_report(report)
    assert table.startswith("gpu-check on cpu") and "dry run: every correctness check" in table
    assert not list(tmp_path.iterdir())  # the runs and pictures were temporary


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_without_a_gpu_the_check_says_so_and_offers_the_dry_run(capsys):
    assert main(["gpu-check"]) == 2
    assert "needs a CUDA device and found cpu; --dry-run" in capsys.readouterr().err
    assert main(["gpu-check", "--dry-run", "--peak-tflops", "0"]) == 2
    assert "--peak-tflops must be > 0" in capsys.readouterr().err
