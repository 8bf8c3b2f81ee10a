"""What the command groups share: the run-store and progress flags, and small parsers."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def runs_dir_parent(nested: bool = False) -> argparse.ArgumentParser:
    """``--runs-dir``. ``nested``: for a sub-command under one that has it too, where argparse
    would otherwise let the inner default (None) replace a value given to the outer."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--runs-dir", help="run store folder (default $LOSSATTN_RUNS or ./runs)",
                        **({"default": argparse.SUPPRESS} if nested else {}))
    return parent


def quiet_parent(background: bool = True) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--quiet", action="store_true", help="no progress bar")
    if background:
        parent.add_argument("--background", action="store_true",
                            help="train in a background process and return at once")
    return parent


def store_of(args: argparse.Namespace):
    from engine.runs import RunStore

    return RunStore(getattr(args, "runs_dir", None))


def command_line() -> str:
    """How this process was started, for model cards (``python -m engine ...``)."""
    return "python -m engine " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers; got {text!r}") from None


def write_json(path: str | None, data) -> None:
    """Also write ``data`` to ``path`` (atomic: the app's pages poll these files)."""
    if path:
        from engine.fsutil import write_json_atomic

        write_json_atomic(Path(path), data)
