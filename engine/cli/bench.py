"""``bench``, ``bench-train`` and ``bench-eval``: what the models and the pipeline cost here."""

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

    device = resolve_device(args.device)
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
                            resolve_device(args.device), args.batch, args.steps)
    return _report(result, args.json, digits=1)


def cmd_bench_eval(args: argparse.Namespace) -> int:
    from engine.bench import bench_evaluation
    from engine.checkpoint import load_model
    from engine.config import DataConfig, config_from_dict
    from engine.data import load_split
    from engine.device import resolve_device

    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint)
    fields = {**ckpt["run_config"]["data"], "test_size": args.images}
    data = load_split(config_from_dict(DataConfig, fields), "test")  # generated / cached first
    result = bench_evaluation(model.to(device), data, device,
                              parse_floats(args.xi_grid, "--xi-grid"))
    return _report(result, args.json, digits=2)


def _report(result: dict, json_path: str | None, digits: int) -> int:
    """One ``key value`` line per figure, and the figures as JSON when asked."""
    width = max(map(len, result)) + 2
    for key, value in result.items():
        shown = f"{value:.{digits}f}" if isinstance(value, float) else value
        print(f"{key:{width}s} {shown}")
    write_json(json_path, result)
    return 0
