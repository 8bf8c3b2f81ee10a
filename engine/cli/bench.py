"""``bench``, ``bench-train``, ``bench-eval`` and ``gpu-check``: what the models and the pipeline
cost here, and whether the CUDA paths work."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.common import add_command, parse_floats, write_json

DEFAULT_BENCH_MODELS = "small_cnn/loss_attention,resnet18/loss_attention"
SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "digits_small_cnn_la.pt"


def register(sub) -> None:
    p = add_command(
        sub, "bench", description="Forward+backward images/s and peak memory per model on "
                                  "random input, each model in a fresh process (its memory "
                                  "is its own): the training default's layout and precision, "
                                  "and on request fp32 and torch.compile beside it.",
        examples=["bench", "bench --models resnet18/loss_attention,small_cnn/mean --batch 64",
                  "bench --compile --compare-fp32 --json bench.json"])
    p.add_argument("--models", default=DEFAULT_BENCH_MODELS,
                   metavar="B/H,...",
                   help=f"comma-separated BACKBONE/HEAD pairs (default: {DEFAULT_BENCH_MODELS})")
    p.add_argument("--batch", type=int, default=128, metavar="N",
                   help="images per step (default: 128)")
    p.add_argument("--input-size", type=int, default=32, metavar="N",
                   help="side of the square random input (default: 32)")
    p.add_argument("--num-classes", type=int, default=10, metavar="N",
                   help="classes the models predict (default: 10)")
    p.add_argument("--steps", type=int, default=5, metavar="N",
                   help="timed steps; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed steps before timing (default: 1)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--compare-fp32", action="store_true",
                   help="also measure plain fp32 eager (CUDA) or the contiguous layout (CPU)")
    p.add_argument("--stride-plans", metavar="PLANS",
                   help="measure each model at these stride plans, e.g. '1,2,1;2,2,1' (the "
                        "backbone's per-stage strides; default: the paper's for the size)")
    p.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    p.add_argument("--no-isolate", action="store_true",
                   help="measure every row in this process (faster; memory figures then include "
                        "heap left over from earlier rows)")
    p.set_defaults(func=cmd_bench)
    _register_pipeline(sub)
    _register_gpu_check(sub)


def _register_pipeline(sub) -> None:
    p = add_command(
        sub, "bench-train", description="Training throughput split into its parts, side by "
                                        "side in one process: the batch pipeline alone, the "
                                        "model alone, and both (a real training step).",
        examples=["bench-train", "bench-train --backbone resnet18 --batch 32 --steps 5"])
    p.add_argument("--dataset", default="digits", metavar="NAME",
                   help="a registered data set (default: digits)")
    p.add_argument("--data-root", metavar="DIR",
                   help="the folder holding the data (default: $LOSSATTN_DATA, else ./data)")
    p.add_argument("--backbone", default="small_cnn", metavar="NAME",
                   help="python -m engine models lists them (default: small_cnn)")
    p.add_argument("--head", default="loss_attention", metavar="NAME",
                   help="python -m engine models lists them (default: loss_attention)")
    p.add_argument("--batch", type=int, default=128, metavar="N",
                   help="images per step (default: 128)")
    p.add_argument("--steps", type=int, default=30, metavar="N",
                   help="timed steps of each kind (default: 30)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_train)

    p = add_command(
        sub, "bench-eval", description="What evaluation costs: one backbone pass over N test "
                                       "images, then the patch metrics at every ξ of a grid "
                                       "(each a re-decode of the cached pass).",
        examples=["bench-eval", "bench-eval first.pt --images 3000 --xi-grid 0,0.1,0.5"])
    p.add_argument("checkpoint", nargs="?", default=str(SHIPPED_CHECKPOINT),
                   help="a checkpoint .pt file (default: the shipped "
                        "checkpoints/digits_small_cnn_la.pt)")
    p.add_argument("--images", type=int, default=10_000, metavar="N",
                   help="test images (default: 10000)")
    grid = ",".join(f"{v / 10:g}" for v in range(11))
    p.add_argument("--xi-grid", default=grid, metavar="X,X,...",
                   help=f"ξ values (default: {grid})")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_eval)


def _register_gpu_check(sub) -> None:
    p = add_command(
        sub, "gpu-check", description="The CUDA paths verified on one GPU in one sitting, in "
                                      "one table beside their targets: bf16 vs fp32, images/s, "
                                      "MFU, compile, real runs, evaluation and the explorer. "
                                      "Exits 1 when a target is missed.",
        examples=["gpu-check --json gpu-check.json", "gpu-check --dry-run"])
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="the GPU (default: auto, the first GPU)")
    p.add_argument("--dry-run", action="store_true",
                   help="rehearse every step at toy sizes on whatever device is here")
    p.add_argument("--peak-tflops", type=float,
                   metavar="X",
                   help="the device's dense bf16 peak (default: from the GPU's name)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out the compile rows (default: measured)")
    p.add_argument("--json", metavar="FILE",
                   help="also write the table's rows to this JSON file")
    p.set_defaults(func=cmd_gpu_check)


def model_list(text: str) -> list[tuple[str, str]]:
    """``"resnet18/loss_attention,timm:resnet18/mean"`` -> [(backbone, head), ...]."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        backbone, sep, head = item.rpartition("/")
        if not sep or not backbone or not head:
            raise ValueError(f"--models entries must look like BACKBONE/HEAD; got {item!r}")
        pairs.append((backbone, head))
    if not pairs:
        raise ValueError("--models is empty")
    return pairs


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.bench import bench_models, format_table, parse_stride_plans, results_as_dicts
    from engine.device import resolve_device

    device = resolve_device(args.device, "--device")
    plans = parse_stride_plans(args.stride_plans) if args.stride_plans else [None]
    results = bench_models(
        model_list(args.models), plans, device, batch=args.batch, steps=args.steps,
        warmup=args.warmup, num_classes=args.num_classes, input_size=args.input_size,
        compare_fp32=args.compare_fp32, compile_=args.compile, isolate=not args.no_isolate,
        echo=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(results))
    write_json(args.json, results_as_dicts(results))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from engine.bench import bench_training
    from engine.config import DataConfig, ModelConfig
    from engine.device import resolve_device

    result = bench_training(DataConfig(dataset=args.dataset, root=args.data_root),
                            ModelConfig(backbone=args.backbone, head=args.head),
                            resolve_device(args.device, "--device"), args.batch, args.steps)
    return _report(result, args.json, digits=1)


def cmd_bench_eval(args: argparse.Namespace) -> int:
    from engine.bench import bench_evaluation
    from engine.checkpoint import load_model
    from engine.config import DataConfig, config_from_dict
    from engine.data import load_split
    from engine.device import resolve_device

    device = resolve_device(args.device, "--device")
    model, ckpt = load_model(args.checkpoint)
    fields = {**ckpt["run_config"]["data"], "test_size": args.images}
    data = load_split(config_from_dict(DataConfig, fields), "test")  # generated / cached first
    result = bench_evaluation(model.to(device), data, device,
                              parse_floats(args.xi_grid, "--xi-grid"))
    return _report(result, args.json, digits=2)


def cmd_gpu_check(args: argparse.Namespace) -> int:
    """Exit 0 when every target is met, 1 when one is missed (the table says which)."""
    import dataclasses

    from engine.device import resolve_device
    from engine.gpu_check import Plan, format_report, run_gpu_check

    device = resolve_device(args.device, "--device")
    if device.type != "cuda" and not args.dry_run:
        raise ValueError(f"gpu-check needs a CUDA device and found {device.type}; "
                         "--dry-run rehearses it here at toy sizes")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ValueError(f"--peak-tflops must be > 0; got {args.peak_tflops}")
    plan = Plan.rehearsal(args.peak_tflops) if args.dry_run else Plan(
        peak_tflops=args.peak_tflops)
    if args.no_compile:
        plan = dataclasses.replace(plan, compile=False)
    report = run_gpu_check(plan, device, echo=lambda line: print(line, file=sys.stderr,
                                                                 flush=True))
    print(format_report(report))
    write_json(args.json, report.as_dict())
    return 1 if report.failed else 0


def _report(result: dict, json_path: str | None, digits: int) -> int:
    """One ``key value`` line per figure, and the figures as JSON when asked."""
    width = max(map(len, result)) + 2
    for key, value in result.items():
        shown = f"{value:.{digits}f}" if isinstance(value, float) else value
        print(f"{key:{width}s} {shown}")
    write_json(json_path, result)
    return 0
