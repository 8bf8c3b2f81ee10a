"""``python -m engine gpu-check``: the CUDA paths, verified in one sitting on one GPU.

The paths that only a GPU takes — bf16 autocast, channels_last, ``torch.compile``, the training
data kept on the GPU with GPU-side augmentation, and (with two or more GPUs) nccl DDP — are run
and measured in one process, which prints one table:

- **bf16 against fp32** on the paper's LA-ResNet18 (trained for two epochs on the embedded digits
  here, so that its patch weights are not those of a random network): image logits, patch
  weights, and the share of patches whose selection at ξ = 0.1 flips;
- **forward+backward images/s and peak memory** for fp32 eager (IEEE: torch's default lets
  cuDNN use TF32), bf16 + channels_last and
  bf16 + channels_last + compile, at batch 128 for 32×32 and 64×64 inputs
  (:func:`engine.bench.bench_one`, each row in a fresh process);
- **model FLOPs utilisation**: FLOPs of one training step counted by
  ``torch.utils.flop_counter`` over the step time and the device's dense bf16 peak
  (:data:`PEAK_TFLOPS`, or ``--peak-tflops``);
- **training runs on CUDA** that must end ``finished``: 2 epochs of digits (bf16,
  channels_last, data on the GPU) and 1 epoch of the CIFAR-10 slice with ``torch.compile``;
  with two or more GPUs, 1 epoch of digits under ``torchrun`` on nccl;
- **the evaluation and explorer paths on CUDA**: the evaluation report (patch metrics, PR curves,
  faithfulness) and the Explorer's picture, weights and Grad-CAM for one image.

``--dry-run`` rehearses the check on whatever device is here at toy sizes, which is how it is
tested without a GPU. It leaves out what is too slow on a CPU (compile, the faithfulness
group's Grad-CAM family, nccl) and cannot show what only a GPU has (tensors left on the CPU
beside CUDA ones, bf16 kernels), and it measures the speed targets without judging them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from engine.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from engine.job_status import State

PEAK_TFLOPS = {"H200 NVL": 835.5, "H100 NVL": 835.5, "H100 PCIe": 756.0, "H200": 989.4,
               "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0,
               "A10G": 70.0, "A10": 125.0}
"""Dense bf16 tensor-core peaks (TFLOPS, no sparsity) from the vendors' data sheets, matched in
this order against ``torch.cuda.get_device_name``: the more specific names first."""

TARGETS = {"speedup": 3.0, "mfu": 0.40, "selection_flips": 0.005, "seconds": 480.0}
"""The issue's targets: bf16 + channels_last at least 3x fp32 eager on LA-ResNet18, MFU at least
40 %, no change in which patches are selected on more than 0.5 % of patches, and the whole
check in under 8 minutes."""

PAPER_MODEL = ModelConfig(backbone="resnet18", head="loss_attention", num_classes=10)


@dataclass(frozen=True)
class Plan:
    """How big each step is: the real check, or the dry run's toy sizes."""

    dry_run: bool = False
    batch: int = 128
    input_sizes: tuple[int, ...] = (32, 64)
    steps: int = 20
    warmup: int = 5
    compile: bool = True
    train_size: int | None = None
    """Digits training images (None: the data set's 12,000)."""
    test_size: int | None = None
    agreement_images: int = 2048
    faithfulness_images: int = 8
    """Images for the evaluation's faithfulness group (Score-CAM: one masked forward per
    feature channel of each image, the slowest path)."""
    peak_tflops: float | None = None
    model: ModelConfig = field(default_factory=lambda: dataclasses.replace(PAPER_MODEL))
    """The model every section trains and measures: the paper's LA-ResNet18 on the GPU; the
    dry run takes the same paths with small_cnn (its stride-free ResNet18 on a CPU spent 40
    of the test suite's seconds on toy-sized steps)."""

    @classmethod
    def rehearsal(cls, peak_tflops: float | None = None) -> Plan:
        return cls(dry_run=True, batch=4, steps=2, warmup=1, compile=False, train_size=32,
                   test_size=16, agreement_images=16, faithfulness_images=0,
                   peak_tflops=peak_tflops,
                   model=dataclasses.replace(PAPER_MODEL, backbone="small_cnn"))


@dataclass
class Row:
    """One line of the table: what was checked, what came out, and whether a target was met."""

    section: str
    check: str
    value: str
    target: str = ""
    met: bool | None = None
    """None: no target (a measurement), or not measurable here."""

    def as_line(self) -> tuple[str, ...]:
        verdict = {True: "yes", False: "NO", None: ""}[self.met]
        return self.section, self.check, self.value, self.target, verdict


@dataclass
class Report:
    device: str
    dry_run: bool = False
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, row: Row, echo: Callable[[str], None] | None = None) -> None:
        self.rows.append(row)
        if echo:
            echo(f"  {row.section}: {row.check} = {row.value}")

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.met is False]

    def as_dict(self) -> dict:
        return {"device": self.device, "dry_run": self.dry_run, "seconds": self.seconds,
                "rows": [asdict(r) for r in self.rows]}


# ----------------------------------------------------------------------------------------------
# Arithmetic (known-answer tested)


def peak_tflops_of(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None when it is not in the table."""
    upper = device_name.upper()
    return next((peak for name, peak in PEAK_TFLOPS.items() if name.upper() in upper), None)


def model_flops_utilisation(flops_per_step: float, step_seconds: float,
                            peak_tflops: float) -> float:
    """Achieved FLOP/s over the device's peak."""
    return flops_per_step / step_seconds / (peak_tflops * 1e12)


def count_step_flops(model: torch.nn.Module, x: torch.Tensor,
                     loss_of: Callable[[object], torch.Tensor]) -> int:
    """FLOPs of one forward + backward (``torch.utils.flop_counter``: matmuls and convolutions,
    the operations that bound a tensor core)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss_of(model(x)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def selection_flips(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of patches selected in one of two (B, M) boolean masks and not in the other."""
    return (a != b).float().mean().item()


# ----------------------------------------------------------------------------------------------
# bf16 against fp32


@torch.no_grad()
def bf16_agreement(model, images: torch.Tensor, device: torch.device, xi: float = 0.1,
                   amp: bool = True, batch: int = 256) -> dict:
    """fp32 eager (IEEE: no TF32) against bf16 autocast + channels_last (the training
    default) on ``images`` (normalised, on the CPU): logit and patch-weight differences, top-1
    agreement and the share of patches whose selection at ``xi`` flips. ``amp=False`` compares
    fp32 with itself in the other layout (a control: no flips)."""
    from engine.device import autocast, ieee_fp32

    model.eval().to(device)
    chunks = images.split(batch)
    with ieee_fp32():
        a = _outputs(model, [x.to(device) for x in chunks], xi)
    model.to(memory_format=torch.channels_last)
    with autocast(device, amp):
        b = _outputs(model, [x.to(device, memory_format=torch.channels_last) for x in chunks],
                     xi)
    model.to(memory_format=torch.contiguous_format)
    scale = a["logits"].abs().max().clamp_min(1e-12)
    return {
        "logit_max_abs": (a["logits"] - b["logits"]).abs().max().item(),
        "logit_max_rel": ((a["logits"] - b["logits"]).abs().max() / scale).item(),
        "top1_agree": (a["logits"].argmax(1) == b["logits"].argmax(1)).float().mean().item(),
        "weight_max_abs": (a["weights"] - b["weights"]).abs().max().item(),
        "weight_mean_abs": (a["weights"] - b["weights"]).abs().mean().item(),
        "selection_flips": selection_flips(a["selected"], b["selected"]),
        "patches": a["selected"].numel(),
    }


def _outputs(model, batches: list[torch.Tensor], xi: float) -> dict[str, torch.Tensor]:
    """Logits, patch weights and selections over ``batches``, in fp32 on the CPU."""
    from engine.metrics import selection_mask

    outs = [model(x, xi=xi) for x in batches]
    weights = torch.cat([out.patch_weights.float().cpu() for out in outs])
    return {"logits": torch.cat([out.logits.float().cpu() for out in outs]), "weights": weights,
            "selected": selection_mask(weights, model.selection)}


# ----------------------------------------------------------------------------------------------
# Throughput and MFU


def throughput_rows(plan: Plan, device: torch.device, report: Report, echo) -> None:
    """fwd+bwd images/s and peak memory per mode and input size, with speed-up and MFU."""
    from engine.bench import BenchMode

    modes = [BenchMode(FP32, ieee_fp32=True), BenchMode("bf16+channels_last", True, True)]
    if plan.compile:
        modes.append(BenchMode("bf16+channels_last+compile", True, True, True))
    peak = plan.peak_tflops or (peak_tflops_of(torch.cuda.get_device_name(device))
                                if device.type == "cuda" else None)
    for size in plan.input_sizes:
        cfg = dataclasses.replace(plan.model, input_size=size)
        flops = _step_flops(cfg, device, plan.batch)
        results = {m.name: _measured(plan, cfg, m, device, report, echo) for m in modes}
        base = results[FP32]
        for name, r in results.items():
            if r is None or name == FP32 or base is None:
                continue
            ratio = r.images_per_s / base.images_per_s
            judged = name == modes[1].name  # the target: bf16 + channels_last
            report.add(Row("speed-up", f"{size}x{size} {name} / {FP32}", f"{ratio:.2f}x",
                           f">= {TARGETS['speedup']:g}x" if judged else "",
                           _judged(plan, ratio >= TARGETS["speedup"]) if judged else None),
                       echo)
        _mfu_rows(plan, size, flops, results, peak, report, echo)


FP32 = "fp32 eager (IEEE)"
"""The baseline: true fp32. torch's default lets cuDNN convolutions use TF32 (half bf16's
peak), which would make "fp32" a third precision."""


def _measured(plan: Plan, cfg: ModelConfig, mode, device: torch.device, report: Report, echo):
    """One throughput row (each in a fresh process on a GPU, for clean peaks); a row that
    raises is a failed row and the others still run."""
    from engine.bench import bench_isolated, bench_one

    measure = bench_one if plan.dry_run else bench_isolated
    name = f"{cfg.input_size[0]}x{cfg.input_size[1]} b{plan.batch} {mode.name}"
    try:
        r = measure(cfg, mode, device, plan.batch, plan.steps, plan.warmup)
    except Exception as exc:  # noqa: BLE001 - the table must still come out, naming what broke
        report.add(Row("throughput", name, f"raised {exc.__class__.__name__}: {exc}"[:200],
                       "no error", False), echo)
        return None
    report.add(Row("throughput", name, f"{r.images_per_s:,.0f} img/s, "
                   f"{r.peak_mem_mb:,.0f} MB peak"), echo)
    return r


def _mfu_rows(plan: Plan, size: int, flops: int, results: dict, peak: float | None,
              report: Report, echo) -> None:
    """MFU of every mode; the target is judged on the best bf16 mode."""
    what = f"{size}x{size}, {flops / 1e9:,.1f} GFLOP/step"
    if peak is None:
        report.add(Row("MFU", what, "n/a: device peak unknown (pass --peak-tflops)"), echo)
        return
    mfus = {name: model_flops_utilisation(flops, r.step_ms / 1000, peak)
            for name, r in results.items() if r is not None}
    for name, mfu in mfus.items():
        report.add(Row("MFU", f"{what}: {name}", f"{mfu:.1%} of {peak:g} TFLOPS (bf16 peak)"),
                   echo)
    best = max((name for name in mfus if name.startswith("bf16")), key=mfus.get, default=None)
    if best is not None:
        report.add(Row("MFU", f"{size}x{size} best bf16 mode ({best})", f"{mfus[best]:.1%}",
                       f">= {TARGETS['mfu']:.0%}", _judged(plan, mfus[best] >= TARGETS["mfu"])),
                   echo)


def _judged(plan: Plan, met: bool | None) -> bool | None:
    """Speed targets are the GPU's: a rehearsal measures them but does not judge them."""
    return None if plan.dry_run else met


def _step_flops(cfg: ModelConfig, device: torch.device, batch: int) -> int:
    """FLOPs of the very step the throughput rows time (:func:`engine.bench.step_parts`)."""
    from engine.bench import step_parts

    model, loss_of, x = step_parts(cfg, batch, device)
    return count_step_flops(model, x, loss_of)


# ----------------------------------------------------------------------------------------------
# Training, evaluation and the explorer on the device


def train_checks(plan: Plan, device: torch.device, root: Path, report: Report, echo):
    """The digits and CIFAR-slice runs; returns the digits run (the later checks use it)."""
    from engine.runs import RunStore

    store = RunStore(root / "runs")
    digits = _train(store, "gpu-check-digits", plan.model, device, DataConfig(
        train_size=plan.train_size, test_size=plan.test_size), epochs=2)
    report.add(_run_row("digits, 2 epochs (the device's training defaults)", digits), echo)
    # 896 = 7 batches of 128 of the slice's 932: a short last batch would compile again
    cifar = DataConfig(dataset="cifar10", train_size=plan.train_size or 896,
                       test_size=plan.test_size)
    what = f"CIFAR-10 slice, 1 epoch{' (compile; img/s includes it)' if plan.compile else ''}"
    try:
        run = _train(store, "gpu-check-cifar", plan.model, device, cifar, epochs=1,
                     compile_=plan.compile)
        report.add(_run_row(what, run), echo)
    except Exception as exc:  # noqa: BLE001 - e.g. the slice is not here: the rest still runs
        report.add(Row("training", what, f"not run: {exc.__class__.__name__}: {exc}"[:200],
                       "finished", False), echo)
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        report.add(_nccl_row(store, plan), echo)
    return digits


def _train(store, name: str, model: ModelConfig, device: torch.device, data: DataConfig,
           epochs: int, compile_: bool = False):
    from engine.data import load_split
    from engine.train import prepare_run_config, train_run

    load_split(data, "test")  # a missing data set is named before a run is created for it
    config = RunConfig(name=name, model=model, data=data, train=TrainConfig(
        epochs=epochs, batch_size=128, device=str(device), compile=compile_))
    run = store.create(prepare_run_config(config))
    train_run(run, progress_bar=False, console=False)
    return run


def _run_row(what: str, run) -> Row:
    status = run.status()
    state, progress = status.state, status.fields
    detail = (f"{state}, {progress.get('images_per_s') or 0:,.0f} img/s on "
              f"{progress.get('device')}, data on device: {progress.get('data_on_device')}, "
              f"{progress.get('metric_name')} {progress.get('last_metric') or 0:.3f}")
    if state != State.FINISHED:
        detail += f" ({status.reason})"
    return Row("training", what, detail, "finished", state == State.FINISHED)


def _nccl_row(store, plan: Plan) -> Row:
    """1 epoch of digits on two GPUs under torchrun (nccl DDP)."""
    root = str(store.root)
    what = "digits, 1 epoch, 2 GPUs (nccl DDP)"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--standalone", "-m", "engine", "train", "--runs-dir", root, "--name",
               "gpu-check-nccl", "--preset", "none", "--backbone", plan.model.backbone,
               "--batch-size", "128", "--epochs", "1", "--quiet"]
    if plan.train_size:
        command += ["--train-size", str(plan.train_size), "--test-size", str(plan.test_size)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              check=False, cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return Row("training", what, "did not end within 300 s", "finished", False)
    if not (store.root / "gpu-check-nccl").is_dir():
        return Row("training", what, f"did not start: {done.stderr[-160:]}", "finished", False)
    run = store.get("gpu-check-nccl")
    row, world = _run_row(what, run), run.status().fields.get("world")
    return dataclasses.replace(row, value=f"{row.value}, world {world}",
                               met=bool(row.met) and world == 2)


class Trained(NamedTuple):
    """The digits run's model (on the device) and test set, which the later sections share."""

    run: object
    model: torch.nn.Module
    data: object


def load_trained(run, device: torch.device) -> Trained:
    from engine.checkpoint import load_model
    from engine.data import load_split

    model, _ = load_model(run.last_checkpoint)
    return Trained(run, model.to(device), load_split(run.config().data, "test"))


def evaluation_checks(plan: Plan, trained: Trained, device: torch.device, report: Report,
                      echo) -> None:
    """The evaluation report (every metric group, at 3 ξ) of the trained model on ``device``."""
    from engine.evaluate import evaluate_model

    model, data = trained.model, trained.data
    started = time.perf_counter()
    result = evaluate_model(model, data, device, xi_grid=[0.0, 0.1, 0.5],
                            faithfulness_images=min(plan.faithfulness_images, len(data)))
    seconds = time.perf_counter() - started
    xi = model.config.xi
    at = next(row for row in result["by_xi"] if row["xi"] == xi)
    accuracy, patch_f = at["image"]["accuracy"], at["patch"]["f"]
    faithful = (f"faithfulness (Grad-CAM family) on {plan.faithfulness_images}"
                if plan.faithfulness_images else "no faithfulness")
    faithful_ok = not plan.faithfulness_images or "faithfulness" in result
    report.add(Row("evaluation", f"report on {len(data):,} images, 3 ξ, {faithful}",
                   f"{seconds:.1f} s; at ξ = {xi:g}: image acc {accuracy:.3f}, patch F "
                   f"{patch_f:.3f}", "finite, complete",
                   faithful_ok and all(map(math.isfinite, (accuracy, patch_f)))), echo)


def explorer_checks(trained: Trained, root: Path, report: Report, echo) -> None:
    """What the Patch Explorer and ``explain`` produce for one image: picture, weights CSV,
    Eq. 5's breakdown and Grad-CAM, computed on the model's device."""
    from PIL import Image

    from engine.explain_image import explain_file

    model, run, data = trained.model, trained.run, trained.data

    image = root / "explorer-input.png"
    Image.fromarray(data.images[0].permute(1, 2, 0).numpy()).save(image)
    out = root / "explain"
    out.mkdir(exist_ok=True)
    started = time.perf_counter()
    result = explain_file(model, list(data.classes), run.config().data, image, out, 0.1,
                          ["loss_attention", "gradcam"], None)
    seconds = time.perf_counter() - started
    written = [name for name in result["files"] if (out / name).is_file()]
    ok = len(written) == len(result["files"]) and result["eq5"]["exact"]
    report.add(Row("explorer", "one image: picture, weights, Eq. 5, Grad-CAM",
                   f"{seconds:.2f} s, {result['patches_kept']}/{result['patches']} patches "
                   f"kept, {len(written)} files", "all written, Eq. 5 exact", bool(ok)), echo)


# ----------------------------------------------------------------------------------------------
# The whole check


def run_gpu_check(plan: Plan, device: torch.device, echo=None,
                  workdir: str | Path | None = None) -> Report:
    """Every section in turn; a section that raises is a failed row, and the rest still run."""
    report = Report(_device_name(device), plan.dry_run)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=workdir) as tmp:
        root = Path(tmp)
        digits = _section(report, "training", echo,
                          lambda: train_checks(plan, device, root, report, echo))
        trained = digits and _section(report, "training", echo,
                                      lambda: load_trained(digits, device))
        if trained:  # each its own section: one that fails does not hide the others
            _section(report, "bf16", echo,
                     lambda: agreement_rows(plan, trained, device, report, echo))
            _section(report, "evaluation", echo,
                     lambda: evaluation_checks(plan, trained, device, report, echo))
            _section(report, "explorer", echo,
                     lambda: explorer_checks(trained, root, report, echo))
        _section(report, "throughput", echo,
                 lambda: throughput_rows(plan, device, report, echo))
    report.seconds = time.perf_counter() - started
    report.add(Row("total", "wall time of the check", f"{report.seconds:.0f} s",
                   f"<= {TARGETS['seconds']:.0f} s",
                   _judged(plan, report.seconds <= TARGETS["seconds"])), echo)
    return report


def _section(report: Report, name: str, echo, body):
    started = time.perf_counter()
    try:
        result = body()
        if echo:
            echo(f"  ({name}: {time.perf_counter() - started:.0f} s)")
        return result
    except Exception as exc:  # noqa: BLE001 - the table must still come out, naming what broke
        report.add(Row(name, f"{name} section", f"raised {exc.__class__.__name__}: {exc}"[:200],
                       "no error", False), echo)
        return None


def agreement_rows(plan: Plan, trained: Trained, device: torch.device, report: Report,
                   echo) -> None:
    from engine.data.base import model_input
    from engine.device import amp_supported

    data = trained.data
    images = model_input(data, data.images[:plan.agreement_images], torch.device("cpu"))
    r = bf16_agreement(trained.model, images, device, xi=0.1)
    model = ("LA-ResNet18" if plan.model.backbone == "resnet18"
             else f"{plan.model.backbone}/{plan.model.head}")
    name = f"{model}, {len(images):,} digits test images, ξ = 0.1"
    if not amp_supported(device):  # autocast is a no-op there: the rows compare layouts only
        name += " (bf16 autocast inactive on this device)"
    report.add(Row("bf16 vs fp32", f"{name}: logits",
                   f"max |Δ| {r['logit_max_abs']:.3g} ({r['logit_max_rel']:.2%} of max |logit|)"
                   f", top-1 agree {r['top1_agree']:.2%}"), echo)
    report.add(Row("bf16 vs fp32", "patch weights",
                   f"max |Δ| {r['weight_max_abs']:.3g}, mean |Δ| {r['weight_mean_abs']:.3g}"),
               echo)
    report.add(Row("bf16 vs fp32", f"selected patches flipped ({r['patches']:,} patches)",
                   f"{r['selection_flips']:.3%}", f"<= {TARGETS['selection_flips']:.1%}",
                   r["selection_flips"] <= TARGETS["selection_flips"]), echo)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    return f"{device.type} ({os.cpu_count()} cores), torch {torch.__version__}"


def format_report(report: Report) -> str:
    header = ("section", "check", "value", "target", "met")
    rows = [header] + [r.as_line() for r in report.rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"gpu-check on {report.device}: {report.seconds:.0f} s"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(2, "  ".join("-" * w for w in widths))
    missed = report.failed
    if missed:
        lines.append(f"{len(missed)} target(s) missed: " + "; ".join(r.check for r in missed))
    elif report.dry_run:
        lines.append("dry run: every correctness check passed at toy sizes; the speed targets "
                     "are a GPU's and were measured, not judged")
    else:
        lines.append("all targets met")
    return "\n".join(lines)
