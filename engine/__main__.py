"""Command line: ``python -m engine <command>``. Everything the app does is scriptable here."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

DEFAULT_BENCH_MODELS = "small_cnn/loss_attention,resnet18/loss_attention"


def _model_list(text: str) -> list[tuple[str, str]]:
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


def cmd_models(args: argparse.Namespace) -> int:
    from engine.models import backbone_descriptions, head_spec, list_heads

    print("backbones:")
    for name, text in backbone_descriptions().items():
        print(f"  {name:24s} {text}")
    print("heads:")
    for name in list_heads():
        print(f"  {name:24s} {head_spec(name).description}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.bench import (
        bench_isolated,
        bench_one,
        format_table,
        modes_for,
        results_as_dicts,
    )
    from engine.config import ModelConfig
    from engine.device import resolve_device

    device = resolve_device(args.device)
    configs = [ModelConfig(backbone=b, head=h, num_classes=args.num_classes,
                           input_size=args.input_size) for b, h in _model_list(args.models)]
    run = bench_one if args.no_isolate else bench_isolated
    results = []
    for cfg in configs:
        for mode in modes_for(device, args.compare_fp32, args.compile):
            result = run(cfg, mode, device, args.batch, args.steps, args.warmup)
            results.append(result)
            print(f"  measured {result.model} [{result.mode}]: {result.images_per_s:.1f} img/s",
                  file=sys.stderr, flush=True)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results_as_dicts(results), fh, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered backbones and heads")
    p.set_defaults(func=cmd_models)

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
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--no-isolate", action="store_true",
                   help="measure every row in this process (faster; memory figures then include "
                        "heap left over from earlier rows)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch", "steps", "input_size", "num_classes"):
        if getattr(args, name, 1) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except ValueError as exc:  # ConfigError included: a message for a person, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
