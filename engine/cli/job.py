"""``job``: run a background job from its folder (how every job the app or a starter spawns
runs; :mod:`engine.jobs`)."""

from __future__ import annotations

import argparse

from engine.cli.common import add_command


def register(sub) -> None:
    p = add_command(
        sub, "job", description="Run the job whose folder holds spec.json (its kind and "
                                "settings: a training run, a sweep, a benchmark or a MIL "
                                "experiment), as the app and every background start do. "
                                "Its status, log and STOP file are in the same folder.",
        examples=["job runs/first", "job runs/_sweeps/tab6"])
    p.add_argument("folder", metavar="FOLDER", help="the job folder (it holds spec.json)")
    p.set_defaults(func=cmd_job)


def cmd_job(args: argparse.Namespace) -> int:
    from engine.job_run import run_job

    return run_job(args.folder)
