"""What the command groups share: how a command is declared (its description and examples),
the run-store and progress flags, and small parsers."""

from __future__ import annotations

import argparse
import sys

from engine.cli.commands import summary
from engine.cli.formatting import Formatter


def add_command(sub, name: str, description: str, examples: list[str], **kwargs
                ) -> argparse.ArgumentParser:
    """Declare command ``name``: its one-line help comes from :mod:`engine.cli.commands` (what
    the top-level ``--help`` lists), ``description`` is its paragraph and ``examples`` its
    command lines (without ``python -m engine``), shown under its ``--help``."""
    epilog = "examples:\n\n" + "\n".join(f"  python -m engine {line}" for line in examples)
    return sub.add_parser(name, help=summary(name), description=description, epilog=epilog,
                          formatter_class=Formatter, **kwargs)


def runs_dir_parent(nested: bool = False) -> argparse.ArgumentParser:
    """``--runs-dir``. ``nested``: for a sub-command under one that has it too, where argparse
    would otherwise let the inner default (None) replace a value given to the outer."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--runs-dir", metavar="DIR",
                        help="the run store folder (default: $LOSSATTN_RUNS, else ./runs)",
                        **({"default": argparse.SUPPRESS} if nested else {}))
    return parent


def quiet_parent(background: bool = True) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--quiet", action="store_true",
                        help="no progress bar (default: a bar on stderr)")
    if background:
        parent.add_argument("--background", action="store_true",
                            help="train in a background process and return at once")
    return parent


def store_of(args: argparse.Namespace):
    from engine.runs import RunStore

    return RunStore(getattr(args, "runs_dir", None))


def command_line() -> str:
    """How this process was started, for model cards (``python -m engine ...``)."""
    import shlex

    return "python -m engine " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers; got {text!r}") from None


def write_json(path: str | None, data) -> None:
    """Also write ``data`` to ``path`` (atomic: the app's pages poll these files)."""
    if path:
        from pathlib import Path

        from engine.fsutil import write_json_atomic

        write_json_atomic(Path(path), data)


def add_faithfulness_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--mask`` and ``--random-draws``, as ``evaluate`` and ``transfer`` judge maps: the names
    and defaults from :mod:`engine.metric_table` (no torch), so argparse itself refuses an
    unknown mask with the choices."""
    from engine.metric_table import DEFAULT_MASK, MASKS, RANDOM_DRAWS

    p.add_argument("--mask", default=DEFAULT_MASK, choices=list(MASKS),
                   help=f"{prefix}what replaces the pixels a map leaves out: "
                        + "; ".join(f"{k}: {v}" for k, v in MASKS.items())
                        + f"; also deletion's fill (default: {DEFAULT_MASK}; see "
                          "docs/faithfulness.md)")
    p.add_argument("--random-draws", type=int, default=RANDOM_DRAWS, metavar="K",
                   help=f"{prefix}seeded draws of the random reference map, averaged "
                        f"(default: {RANDOM_DRAWS})")
