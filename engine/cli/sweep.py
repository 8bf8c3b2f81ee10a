"""``sweep``: train a grid of runs (the paper's γmax x ξ by default) and tabulate it."""

from __future__ import annotations

import argparse
import sys

from engine.cli.common import add_command, runs_dir_parent, store_of
from engine.cli.runs import add_config_flags, run_config_data, validated_run_config


def register(sub) -> None:
    p = add_command(
        sub, "sweep", parents=[runs_dir_parent()],
        description="Train a grid of runs, each an ordinary run tagged sweep:NAME, then "
                    "evaluate them and print the table (report.json and report.csv beside "
                    "it). The grid defaults to the paper's Table VI, γmax {0, 0.1} x ξ {0, "
                    "0.1}; every cell takes the train flags and its preset (with no model "
                    "flags: the digits' small CNN on the live preset). Cells run side by side "
                    "as background jobs, or as tasks on a Ray cluster.",
        examples=["sweep --epochs 5",
                  ("sweep --grid loss.gamma_max=0,0.05,0.1 --grid model.xi=0,0.1,0.5 "
                   "--sweep-name tab6 --seeds 3"),
                  "sweep --sweep-name tab6 --report-only", "sweep --sweep-name tab6 --stop"])
    add_config_flags(p)
    p.add_argument("--grid", action="append", metavar="SECTION.FIELD=V1,V2",
                   help="a grid axis (repeatable; default: loss.gamma_max=0,0.1 and "
                        "model.xi=0,0.1, the paper's Table VI)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train every cell with N seeds (train.seed = the config's seed, +1, "
                        "...; 1-20): the table gives mean ± sd over them (default: 1)")
    p.add_argument("--sweep-name", default="sweep", metavar="NAME",
                   help="names and tags the runs (default: sweep)")
    p.add_argument("--parallel", default="auto",
                   help="cells at once, each a background job of its own (1: one after another "
                        "in this process). auto: one per visible GPU; on a CPU as many as the "
                        "store's job limit ($LOSSATTN_MAX_JOBS, default one per core), each "
                        "with its share of the threads, which finished four digits runs in "
                        "the time of two or three one after another (default: auto)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where the cells train: this machine (default), or as tasks on a Ray "
                        "cluster (the run store on a filesystem every node mounts)")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="a running Ray cluster (or 'auto'); default: start a local Ray")
    p.add_argument("--ray-cpus", type=float, default=1.0, metavar="X",
                   help="CPUs each cell's task declares (default: 1)")
    p.add_argument("--ray-gpus", type=float, default=0.0, metavar="X",
                   help="GPUs each cell's task declares (default: 0)")
    p.add_argument("--ray-retries", type=int, default=3, metavar="N",
                   help="retries of a cell whose worker died (it resumes from its checkpoint; "
                        "default: 3)")
    p.add_argument("--stop", action="store_true",
                   help="stop the running sweep --sweep-name (its process and its cells)")
    p.add_argument("--report-only", action="store_true",
                   help="only (re)write the table of the runs already there")
    p.add_argument("--device-eval", default="auto", metavar="DEVICE",
                   help="device for the report's evaluation (default: auto)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (default: a bar on stderr)")
    p.set_defaults(func=cmd_sweep)

    p = add_command(
        sub, "gamma-family", parents=[runs_dir_parent()],
        description="Regenerate the shipped γmax family bit for bit: 7 γmax values x 3 seeds "
                    "of the digits' small CNN on the live preset, evaluated, with seed 0 of "
                    "each exported to checkpoints/digits_live_gamma*.pt and the table to "
                    "results/gamma_family/ (about 9 minutes on a 2-core CPU).",
        examples=["gamma-family", "gamma-family --seeds 1 --results /tmp/family"])
    p.add_argument("--checkpoints", default=None, metavar="DIR",
                   help="where seed 0 of every γmax is exported (default: checkpoints/)")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="where results.json/.csv/.md go (default: results/gamma_family/)")
    p.add_argument("--seeds", type=int, default=3, metavar="N",
                   help="seeds per γmax for the results (1-20; default 3)")
    p.add_argument("--parallel", default="auto",
                   help="cells at once (default: auto, the store's job limit; each cell has 1 "
                        "thread)")
    p.set_defaults(func=cmd_gamma_family)


def _parallel(text: str) -> int:
    from engine.sweep import resolve_parallel

    return resolve_parallel(text)


def _ray_resources(args: argparse.Namespace):
    if args.executor != "ray":
        return None
    from engine.cluster import CellResources

    return CellResources(args.ray_cpus, args.ray_gpus, args.ray_retries)


def cmd_sweep(args: argparse.Namespace) -> int:
    from engine.sweep import (
        DEFAULT_GRID,
        format_sweep,
        parse_grid_notes,
        report_with_slot,
        sweep_and_report,
        with_seeds,
    )

    store = store_of(args)
    if args.stop:
        from engine.sweep import stop_sweep, sweep_process_alive

        alive = sweep_process_alive(store, args.sweep_name)
        stop_sweep(store, args.sweep_name)
        print(f"sweep {args.sweep_name}: " + ("stop requested" if alive else
                                              "not running; stopped any cell still training"))
        return 0
    if not args.report_only:
        from engine.device import check_device

        check_device(args.device_eval, "--device-eval")  # before the cells train, not after
        data = run_config_data(args)
        seed = (data.get("train") or {}).get("seed", 0)
        grid, notes = parse_grid_notes(args.grid) if args.grid else (DEFAULT_GRID, [])
        for note in notes:
            print(f"note: --grid {note}", file=sys.stderr)
        grid = with_seeds(grid, args.seeds, seed if isinstance(seed, int) else 0)
        validated_run_config(data, args)  # the base alone: its error names the file and flags
        # The cells get the settings as given, so that each fills its preset by its own head.
        report = sweep_and_report(
            store, data, grid, args.sweep_name, args.parallel, ray_address=args.ray_address,
            ray_resources=_ray_resources(args), device_eval=args.device_eval,
            progress_bar=not args.quiet, log=lambda m: print(m, file=sys.stderr))
    else:
        report = report_with_slot(store, args.sweep_name, args.device_eval)
    print(format_sweep(report))
    print(f"wrote {report['folder']}/report.json and report.csv", file=sys.stderr)
    return 0


def cmd_gamma_family(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine import gamma_family as family
    from engine.sweep import with_seeds

    with_seeds([], args.seeds)  # the flag's range, said before anything trains
    out = family.build_family(
        store_of(args), Path(args.checkpoints or family.CHECKPOINTS),
        Path(args.results or family.RESULTS), args.seeds, parallel=_parallel(args.parallel),
        log=lambda m: print(m, file=sys.stderr))
    print(family.results_markdown(out, 0.1))
    return 0
