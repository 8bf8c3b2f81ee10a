"""The command line, ``python -m engine <command>``: one module per command group, each with
its parser and its handler side by side (:mod:`engine.cli.commands` names them).

The top level is lazy: ``python -m engine --help`` reads only the command table, and a
command's own parser is built (its group imported) only when it is the one invoked, so that
the help and a mistyped command answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Sequence

from engine.cli.commands import COMMANDS, all_groups, groups_of, summary

DESCRIPTION = """\
Loss-Attention Studio on the command line: train, evaluate and explain Loss-Attention models
(and everything the app does), scriptable and torchrun-compatible. Each command has its own
help: python -m engine COMMAND --help.

start here (the digits' small CNN with the live preset: about a minute on a laptop CPU):

  python -m engine train --name first
  python -m engine evaluate first
  python -m engine explain first my_image.png

Errors: an expected one (a bad value, file, checkpoint or run) prints one line and exits 2;
anything else prints one line and exits 1; --debug anywhere on the line shows the traceback."""

POSITIVE = ("batch", "steps", "input_size", "num_classes")
BROKEN_PIPE = 141
"""Exit status when stdout's reader went away (``models | head -1``): 128 + SIGPIPE, what a
shell reports for any Unix tool cut short so, and what ``set -o pipefail`` scripts expect."""


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser. ``commands``: the commands whose full parsers are built (their groups'
    modules imported); every other command is listed by name and one-line help only. None:
    every command in full (tests, tools)."""
    from engine.cli.formatting import Formatter, Parser

    parser = Parser(prog="python -m engine", description=DESCRIPTION, formatter_class=Formatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands", help="each has its own --help")
    wanted = all_groups() if commands is None else groups_of(commands)
    for group in wanted:
        _group_module(group).register(sub)
    for name, (group, _) in COMMANDS.items():
        if group not in wanted:
            sub.add_parser(name, help=summary(name), add_help=False)
    return parser


def _group_module(group: str):
    import importlib

    return importlib.import_module(f"engine.cli.{group}")


def command_of(argv: Sequence[str]) -> str | None:
    """The command a command line invokes: its first word that is not an option (the top
    level's only options, --debug and --help, take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (see the module docstring for exit codes). A process started as a
    background job (:mod:`engine.jobs`) records in its job folder how it ended."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    argv = [a for a in argv if a != "--debug"]
    command = command_of(argv)
    if not argv:  # a newcomer's first try: the commands, not "required: COMMAND"
        build_parser([]).print_help()
        _flush_stdout()
        return 2
    try:
        args = build_parser([command] if command else []).parse_args(argv)
    except SystemExit:  # help shown, or a usage error: its reader may have left already
        _flush_stdout()
        raise
    for name in POSITIVE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    from engine.cli.outcome import run_as_job  # after parsing: the help never needs it

    try:
        return run_as_job(args, debug)
    except BrokenPipeError:
        return stdout_gone()


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise SystemExit(stdout_gone()) from None


def stdout_gone() -> int:
    """Stdout's reader has gone (``python -m engine models | head -1``): stop quietly. Further
    writes, Python's own flush at exit included, go to /dev/null instead of raising again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file behind stdout (a test's capture)
        pass
    return BROKEN_PIPE


def exit_process(code: int) -> None:
    """End ``python -m engine`` with ``code`` (never returns; ``typing.NoReturn`` would cost
    the help's start a tenth of its time to import).

    A torchrun rank (``WORLD_SIZE`` > 1) ends without Python's finalization, once its logs and
    output are flushed. ``destroy_process_group`` leaves gloo's worker threads running (torch
    still holds the backend), and one of them can still be dropping the last collective's work,
    whose tensors were made in Python, while the interpreter finalizes: it then takes the GIL
    of a dying interpreter and the rank aborts ("terminate called without an active
    exception"), so torchrun fails a finished run. Seen in 3 of 167 two-rank runs on a loaded
    2-core machine (0 of 150 since); a core dump showed the thread in ``~AsyncBarrierWork``."""
    import os

    try:
        sys.stdout.flush()  # here, not at exit, where Python would print a traceback for it
    except BrokenPipeError:
        code = stdout_gone()
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
