"""``bench``, ``bench-train``, ``bench-eval`` and ``gpu-check``: what the models and the pipeline
cost here, and whether the CUDA paths work."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.common import parse_floats, write_json

DEFAULT_BENCH_MODELS = "small_cnn/loss_attention,resnet18/loss_attention"
SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "digits_small_cnn_la.pt"


def register(sub) -> None:
    p = sub.add_parser("bench", help="forward+backward images/s and peak memory per model")
    p.add_argument("--models", default=DEFAULT_BENCH_MODELS,
                   help=f"comma-separated BACKBONE/HEAD pairs (default {DEFAULT_BENCH_MODELS})")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--compare-fp32", action="store_true",
                   help="on CUDA, also measure plain fp32 eager in the same run")
    p.add_argument("--stride-plans", help="measure each model at these stride plans, e.g. "
                   "'1,2,1;2,2,1' (the backbone's per-stage strides)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--no-isolate", action="store_true",
                   help="measure every row in this process (faster; memory figures then include "
                        "heap left over from earlier rows)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-train", help="loader-only, model-only and full-step images/s")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--head", default="loss_attention")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    p.set_defaults(func=cmd_bench_train)

    p = sub.add_parser("bench-eval", help="seconds for patch metrics over N images at a ξ grid")
    p.add_argument("checkpoint", nargs="?", default=str(SHIPPED_CHECKPOINT))
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--xi-grid", default=",".join(f"{v / 10:g}" for v in range(11)))
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    p.set_defaults(func=cmd_bench_eval)

    p = sub.add_parser("gpu-check", help="the CUDA paths verified on one GPU, in one table "
                       "(bf16 vs fp32, img/s, MFU, runs, evaluation, explorer)")
    p.add_argument("--device", default="auto", help="default: the first GPU")
    p.add_argument("--dry-run", action="store_true",
                   help="rehearse every step at toy sizes on whatever device is here")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's dense bf16 peak (default: from the GPU's name)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compile rows")
    p.add_argument("--json", help="also write the table's rows to this JSON file")
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
    from engine.bench import (
        bench_isolated,
        bench_one,
        format_table,
        modes_for,
        parse_stride_plans,
        results_as_dicts,
    )
    from engine.config import ModelConfig
    from engine.device import resolve_device

    device = resolve_device(args.device, "--device")
    plans = parse_stride_plans(args.stride_plans) if args.stride_plans else [None]
    configs = [ModelConfig(backbone=b, head=h, num_classes=args.num_classes,
                           input_size=args.input_size, stride_plan=plan)
               for b, h in model_list(args.models) for plan in plans]
    run = bench_one if args.no_isolate else bench_isolated
    results = []
    for cfg in configs:
        for mode in modes_for(device, args.compare_fp32, args.compile):
            result = run(cfg, mode, device, args.batch, args.steps, args.warmup)
            results.append(result)
            print(f"  measured {result.model} [{result.mode}]: {result.images_per_s:.1f} img/s",
                  file=sys.stderr, flush=True)
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
