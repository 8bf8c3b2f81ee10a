"""``mil``: repeated k-fold cross-validation of MIL methods; the results table beside the AAAI
paper's. Its flags are made from :class:`~engine.mil.config.MilConfig`'s fields."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from engine.cli.common import add_command


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
    from engine.cli.fieldhelp import field_docs
    from engine.mil.config import MilConfig

    hints = typing.get_type_hints(MilConfig)
    docs = field_docs(MilConfig)
    for f in dataclasses.fields(MilConfig):
        if f.name == "method":  # --method takes a list, below
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if hints[f.name] is bool:  # --report-test-max / --no-report-test-max
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=_field_help(f, docs, str(f.default).lower()))
            continue
        default = f.default if not isinstance(f.default, tuple) else ",".join(map(str, f.default))
        p.add_argument(flag, type=_flag_type(hints[f.name]), metavar=_metavar(hints[f.name]),
                       help=_field_help(f, docs, default))


def _field_help(field, docs: dict[str, str], default) -> str:
    text = docs[field.name]  # every field has one: tests/test_cli_help.py checks it
    return f"{text.rstrip('.')} (default: {default})".replace("%", "%%")


def _metavar(hint) -> str:
    return {int: "N", float: "X"}.get(hint, "N,N,..." if typing.get_origin(hint) is tuple
                                      else "NAME")


def register(sub) -> None:
    p = add_command(
        sub, "mil", description="Multiple-instance learning: repeated k-fold cross-validation "
                                "(5 x 10 folds by default) of MIL methods on the classic bag "
                                "data sets, and the results table beside the AAAI paper's. "
                                "digit_bags is embedded; the five benchmarks are read from "
                                "--data-root (or $LOSSATTN_DATA)/mil/<set>/.",
        examples=["mil --dataset digit_bags --method loss_attention",
                  ("mil --dataset all --method loss_attention,attention,gated_attention "
                   "--out results/mil"), "mil --dataset musk1 --epoch-choice inner_cv"])
    p.add_argument("--dataset", default="digit_bags", metavar="NAMES",
                   help="all (the five benchmarks), or a comma list of musk1, musk2, fox, tiger, "
                        "elephant, digit_bags, a miproblems folder or a CSV file (default: "
                        "digit_bags)")
    p.add_argument("--method", default="loss_attention", metavar="NAMES",
                   help="comma list of MIL methods (engine.mil.models.MIL_METHODS; default: "
                        "loss_attention)")
    p.add_argument("--out", default="results/mil", metavar="DIR",
                   help="results folder, merged into (default: results/mil)")
    p.add_argument("--data-root", metavar="DIR",
                   help="folder holding mil/<set>/ (default: $LOSSATTN_DATA)")
    add_config_flags(p)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: this job's share of the cores among the "
                        "jobs of the run store, engine.slots)")
    p.add_argument("--quiet", action="store_true",
                   help="no per-pair log lines (default: one per data set and method)")
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
