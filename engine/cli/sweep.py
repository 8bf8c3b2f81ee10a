"""``sweep``: train a grid of runs (the paper's γmax x ξ by default) and tabulate it."""

from __future__ import annotations

import argparse
import sys

from engine.cli.common import runs_dir_parent, store_of
from engine.cli.runs import add_config_flags, run_config_data, validated_run_config


def register(sub) -> None:
    p = sub.add_parser("sweep", parents=[runs_dir_parent()],
                       help="train a grid of runs and tabulate")
    add_config_flags(p)
    p.add_argument("--grid", action="append", metavar="SECTION.FIELD=V1,V2",
                   help="a grid axis (repeatable); default: loss.gamma_max=0,0.1 and "
                        "model.xi=0,0.1 (the paper's Table VI)")
    p.add_argument("--sweep-name", default="sweep", help="names and tags the runs")
    p.add_argument("--parallel", default="1",
                   help="processes at once (auto: one per visible GPU)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where the cells train: this machine (default), or as tasks on a Ray "
                        "cluster (the run store on a filesystem every node mounts)")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="a running Ray cluster (or 'auto'); default: start a local Ray")
    p.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs each cell's task declares")
    p.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs each cell's task declares")
    p.add_argument("--ray-retries", type=int, default=3,
                   help="retries of a cell whose worker died (it resumes from its checkpoint)")
    p.add_argument("--stop", action="store_true",
                   help="stop the running sweep --sweep-name (its process and its cells)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the table")
    p.add_argument("--device-eval", default="auto", help="device for the report's evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)


def _parallel(text: str) -> int:
    if text == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--parallel must be a positive int or auto; got {text!r}")
    return int(text)


def _ray_executor(args: argparse.Namespace, job):
    if args.executor != "ray":
        return None
    from engine.cluster import CellResources, RayExecutor

    return RayExecutor(args.ray_address, CellResources(args.ray_cpus, args.ray_gpus,
                                                       args.ray_retries), job.stop_requested)


def cmd_sweep(args: argparse.Namespace) -> int:
    from engine.device import resolve_device
    from engine.sweep import (
        DEFAULT_GRID,
        format_sweep,
        parse_grid,
        run_sweep,
        sweep_configs,
        sweep_job,
        sweep_report,
        write_manifest,
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
        grid = parse_grid(args.grid) if args.grid else DEFAULT_GRID
        data = run_config_data(args)
        validated_run_config(data, args)  # the base alone: its error names the file and flags
        # The cells get the settings as given, so that each fills its preset by its own head.
        configs = sweep_configs(data, grid, args.sweep_name)
        parallel = _parallel(args.parallel)
        print(f"sweep {args.sweep_name}: {len(configs)} runs", file=sys.stderr)
        write_manifest(store, args.sweep_name, grid)
        # The sweep's own job, in the foreground too (the Sweep page sees it and can stop it),
        # and its report is part of it: "finished" means the table is there.
        job = sweep_job(store, args.sweep_name)
        with job.attach(finish=True, kind="sweep", cells=len(configs), executor=args.executor):
            run_sweep(store, configs, parallel, progress_bar=not args.quiet,
                      log=lambda m: print(m, file=sys.stderr), ray=_ray_executor(args, job))
            report = sweep_report(store, args.sweep_name, resolve_device(args.device_eval))
    else:
        report = sweep_report(store, args.sweep_name, resolve_device(args.device_eval))
    print(format_sweep(report))
    print(f"wrote {report['folder']}/report.json and report.csv", file=sys.stderr)
    return 0
