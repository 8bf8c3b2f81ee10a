"""``mil``: repeated k-fold cross-validation of MIL methods; the results table beside the AAAI
paper's. Its flags are made from :class:`~engine.mil.config.MilConfig`'s fields."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated ints expected; got {text!r}") from None


def _flag_type(hint):
    """The argparse type for a MilConfig annotation (ints, numbers, text, int lists)."""
    if typing.get_origin(hint) is tuple:
        return _int_list
    return hint if hint in (int, float, str) else str


def add_config_flags(p: argparse.ArgumentParser) -> None:
    from engine.mil.config import MilConfig

    hints = typing.get_type_hints(MilConfig)
    for f in dataclasses.fields(MilConfig):
        if f.name == "method":  # --method takes a list, below
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if hints[f.name] is bool:  # --report-test-max / --no-report-test-max
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"MilConfig.{f.name} (default {str(f.default).lower()})")
            continue
        default = f.default if not isinstance(f.default, tuple) else ",".join(map(str, f.default))
        p.add_argument(flag, type=_flag_type(hints[f.name]),
                       help=f"MilConfig.{f.name} (default {default})")


def register(sub) -> None:
    p = sub.add_parser("mil", help="multiple-instance learning: repeated k-fold CV, results table")
    p.add_argument("--dataset", default="digit_bags",
                   help="all (the five benchmarks), or a comma list of musk1, musk2, fox, tiger, "
                        "elephant, digit_bags, a miproblems folder or a CSV file")
    p.add_argument("--method", default="loss_attention",
                   help="comma list of MIL methods (see engine.mil.models.MIL_METHODS)")
    p.add_argument("--out", default="results/mil", help="results folder (merged into)")
    p.add_argument("--data-root", help="folder holding mil/<set>/ (default $LOSSATTN_DATA)")
    add_config_flags(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: this job's share of the cores among the "
                        "jobs of the run store, engine.slots)")
    p.add_argument("--quiet", action="store_true", help="no per-pair log lines")
    p.set_defaults(func=cmd_mil)


def cmd_mil(args: argparse.Namespace) -> int:
    from engine.mil.config import MilConfig
    from engine.mil.experiment import parse_datasets, parse_methods, run_experiment
    from engine.safe_io import JSON_CAP, read_text

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive int; got {args.threads}")
    fields = {f.name for f in dataclasses.fields(MilConfig)} - {"method"}
    values = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    methods = parse_methods(args.method)
    config = MilConfig(method=methods[0], **values)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    run_experiment(parse_datasets(args.dataset), methods, config, args.out, args.data_root,
                   args.threads, log)
    print(read_text(Path(args.out) / "results.md", JSON_CAP, "a results table"))
    return 0
