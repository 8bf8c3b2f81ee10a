"""``transfer``: mutual transfer of local attention maps vs the same peers alone (same seeds)."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from engine.cli.common import add_command, add_faithfulness_flags, runs_dir_parent, store_of
from engine.cli.fieldhelp import field_help
from engine.cli.formatting import Deferred
from engine.cli.runs import METAVARS, add_config_flags, run_config_data, validated_run_config

TRANSFER_FLAGS = {"lam": float, "grid": int, "map_source": str, "layers": int, "power": float,
                  "kl": float}


def register(sub) -> None:
    p = add_command(
        sub, "transfer", parents=[runs_dir_parent()],
        description="Train two or more peers together with the local attention-map transfer "
                    "loss, and the same peers alone with the same seeds (the control), then "
                    "judge every peer's maps by faithfulness (deletion, insertion, pointing) "
                    "and print the comparison beside the seed paper's. The runs are ordinary "
                    "runs (EXPERIMENT-sSEED-mutual / -alone). Unlike train, no preset applies "
                    "unless --preset names one.",
        examples=["transfer --peer small_cnn --peer small_cnn --lam 1 --epochs 8 --seeds 0,1,2",
                  ("transfer --peer small_cnn --peer small_cnn/plain --experiment mine "
                   "--train-size 4000")])
    add_config_flags(p, own_preset="none")  # an experiment's own protocol: transfer_config
    p.add_argument("--peer", action="append", metavar="BACKBONE[/HEAD]",
                   help="a peer (repeat: two or more); HEAD defaults to loss_attention "
                        "(default: the --config file's model and transfer.peers)")
    for flag, kind in TRANSFER_FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None,
                       metavar=METAVARS.get(kind, "NAME"),
                       help=Deferred(functools.partial(field_help, "transfer", flag)))
    p.add_argument("--seeds", default="0", metavar="N,N,...",
                   help="comma-separated seeds, e.g. 0,1,2 (default: 0)")
    p.add_argument("--experiment", default="transfer",
                   help="names the runs (EXPERIMENT-sSEED-mutual / -alone) and the results "
                        "(default: transfer)")
    p.add_argument("--control", metavar="EXPERIMENT",
                   help="share the alone (λ = 0) runs of this experiment, trained and judged "
                        "once whatever λ the mutual arm has (default: the experiment's own)")
    p.add_argument("--eval-images", type=int, default=500,
                   metavar="N", help="test images on which the maps are judged (default: 500)")
    p.add_argument("--steps", type=int, default=16, metavar="N",
                   help="deletion / insertion steps (default: 16)")
    add_faithfulness_flags(p)
    p.add_argument("--out", metavar="DIR",
                   help="results folder (default: results/transfer/EXPERIMENT)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (default: a bar on stderr)")
    p.set_defaults(func=cmd_transfer)


def transfer_config(args: argparse.Namespace):
    """The experiment's base RunConfig: the config file and flags, with the peers (``--peer``,
    else the file's model and ``transfer.peers``) and the transfer flags."""
    from engine.config import ConfigError

    data = run_config_data(args)
    transfer = data["transfer"] if isinstance(data.get("transfer"), dict) else {}
    for flag in TRANSFER_FLAGS:
        if getattr(args, flag) is not None:
            transfer[flag] = getattr(args, flag)
    if args.peer:
        if len(args.peer) < 2:
            raise ConfigError(f"--peer: mutual transfer needs at least two peers; got "
                              f"{len(args.peer)} (e.g. --peer small_cnn --peer small_cnn/plain)")
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        models = [{**model, **_peer_fields(text)} for text in args.peer]
        data["model"], transfer["peers"] = models[0], models[1:]
    elif not transfer.get("peers"):
        raise ConfigError("--peer: mutual transfer needs at least two peers (--peer A --peer B, "
                          "or a config file with a model and transfer.peers)")
    data["transfer"] = transfer
    # An experiment's own protocol: no data-set default preset (the digits' live schedule)
    # unless --preset or the file names one, so the shipped results/transfer tables reproduce.
    data.setdefault("preset", None)
    return validated_run_config(data, args)


def _peer_fields(text: str) -> dict:
    from engine.config import ConfigError

    backbone, _, head = text.partition("/")
    if not backbone or "/" in head:
        raise ConfigError(f"--peer must be BACKBONE or BACKBONE/HEAD; got {text!r}")
    return {"backbone": backbone, "head": head or "loss_attention"}


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated ints; got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct ints >= 0; got {text!r}")
    return seeds


def cmd_transfer(args: argparse.Namespace) -> int:
    from engine.train import check_machine
    from engine.transfer import format_results, run_experiment

    if args.eval_images < 1 or args.steps < 1:
        raise ValueError("--eval-images and --steps must be >= 1")
    if args.random_draws < 1:
        raise ValueError(f"--random-draws must be >= 1; got {args.random_draws}")
    base = transfer_config(args)
    check_machine(base)  # before the first of the experiment's runs is made
    seeds = _seeds(args.seeds)
    out = Path(args.out or Path("results") / "transfer" / args.experiment)
    report = run_experiment(store_of(args), base, args.experiment, seeds,
                            images=args.eval_images, steps=args.steps, out=out,
                            mask=args.mask, draws=args.random_draws,
                            progress_bar=not args.quiet,
                            on_progress=lambda text: print(text, file=sys.stderr),
                            control=args.control)
    print(format_results(report))
    print(f"wrote {out}/results.md, results.json and results.csv", file=sys.stderr)
    return 0
