"""The command line, ``python -m engine <command>``: one module per command group, each with
its parser and its handler side by side. Everything the app does is scriptable here.

  models                      list backbones, heads and presets
  data list | check NAME      list data sets; check that one loads (counts, classes, boxes)
  train [--config F] [flags]  create a run and train it (foreground with a progress bar, or
                              --background); torchrun-compatible; --preset NAME fills the
                              fields not given (paper, released-code)
  resume NAME                 continue a stopped or killed run from its last checkpoint
  runs [list|show|stop|delete|reindex]
  export NAME --out F.pt      a run's best model as a small checkpoint with a model card
  evaluate RUN_OR_CHECKPOINT  every metric, JSON + CSV report (--xi-grid, --faithfulness-images)
  explain CKPT IMAGE... --out D  the Explorer's picture, weights CSV and prediction JSON per
                              image (--xi, --method gradcam|gradcam++|scorecam|all, --class)
  sweep --grid a.b=1,2 ...    train a grid of runs (γmax x ξ by default) and tabulate it
  bench                       forward+backward images/s and peak memory per model
  bench-train                 loader-only vs model-only vs full training step images/s
  bench-eval                  patch metrics over N images at a ξ grid
  gpu-check [--dry-run]       the CUDA paths on one GPU: bf16 vs fp32, img/s, MFU, runs
  mil --dataset D --method M  MIL 5 x 10-fold CV; results table beside the AAAI paper's
  transfer --peer A --peer B  mutual transfer of local attention maps vs the peers alone (same
                              seeds): faithfulness of every peer's maps, beside the seed paper's

Errors: an expected one (a bad value, file, checkpoint or run; every engine error is a
ValueError, and OSError) prints one line and exits 2; anything else prints one line and exits 1.
``--debug`` anywhere on the line shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from engine.cli import bench, evaluate, explain, info, mil, runs, sweep, transfer

GROUPS = (info, runs, evaluate, explain, sweep, bench, mil, transfer)
POSITIVE = ("batch", "steps", "input_size", "num_classes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (see the module docstring for exit codes). A process started as a
    background job (:mod:`engine.jobs`) records in its job folder how it ended."""
    from engine import jobs

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    for name in POSITIVE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    job = jobs.spawned_job()
    try:
        with job.attach() if job else contextlib.nullcontext(), _slot_of(job):
            code = _run_saying_why(args, debug)
            if job and job.folder.is_dir():  # a folder removed under the job is not made again
                job.complete(code)
            return code
    except jobs.JobStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # expected: a message a person can act on
        if debug:
            raise
        _say(exc, expected=True)
        return 2
    except Exception as exc:  # unforeseen: still one line, and a way to see more
        if debug:
            raise
        _say(exc, expected=False)
        return 1


_SAID = "(said on stderr)"


def _run_saying_why(args: argparse.Namespace, debug: bool) -> int:
    """The command. Its error line is printed here, inside the job's ``attach``: a job's status
    says ``failed`` only once its last output line (what the pages show as the reason's
    source) is written. Seen on a loaded machine: a status read as failed before the line."""
    try:
        return args.func(args)
    except Exception as exc:
        if not debug:
            _say(exc, expected=isinstance(exc, ValueError | OSError))
        raise


def _say(exc: BaseException, expected: bool) -> None:
    """The one line of an error, once (the note marks it said)."""
    if _SAID in getattr(exc, "__notes__", ()):
        return
    if expected:
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    else:
        print(f"error: unexpected {exc.__class__.__name__}: {one_line(exc)} (run with --debug "
              "for the traceback)", file=sys.stderr, flush=True)
    exc.add_note(_SAID)


def _slot_of(job):
    """A spawned job that computes holds the slot its starter took for it until the process
    ends (:mod:`engine.slots`); giving it back starts the next queued job."""
    if job is None:
        return contextlib.nullcontext()
    from engine.budget import holding
    from engine.slots import store_root_of

    return holding(store_root_of(job.folder), job.folder, adopt_only=True)


def one_line(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return " ".join(text.split())


def exit_process(code: int) -> NoReturn:
    """End ``python -m engine`` with ``code``.

    A torchrun rank (``WORLD_SIZE`` > 1) ends without Python's finalization, once its logs and
    output are flushed. ``destroy_process_group`` leaves gloo's worker threads running (torch
    still holds the backend), and one of them can still be dropping the last collective's work,
    whose tensors were made in Python, while the interpreter finalizes: it then takes the GIL
    of a dying interpreter and the rank aborts ("terminate called without an active
    exception"), so torchrun fails a finished run. Seen in 3 of 167 two-rank runs on a loaded
    2-core machine (0 of 150 since); a core dump showed the thread in ``~AsyncBarrierWork``."""
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
