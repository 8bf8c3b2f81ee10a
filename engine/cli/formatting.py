"""How help looks: the formatter, and help texts made only when help is shown.

Kept apart from :mod:`engine.cli.common` because ``python -m engine --help`` needs this and
nothing else of it (every engine module is compiled at import under the project's
PYTHONDONTWRITEBYTECODE, so the help's cost grows with the source it reads).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable


class Formatter(argparse.HelpFormatter):
    """Paragraphs (separated by blank lines) are wrapped to the terminal; an indented block
    (examples, a table) is kept as written. argparse's own choice is all or nothing."""

    def __init__(self, prog: str, **kwargs) -> None:
        kwargs.setdefault("width", terminal_width() - 2)  # argparse's own margin
        super().__init__(prog, **kwargs)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = textwrap.dedent(text).strip("\n").split("\n\n")
        return "\n\n".join(
            textwrap.indent(block, indent) if block.startswith("  ") else textwrap.fill(
                " ".join(block.split()), width, initial_indent=indent, subsequent_indent=indent,
                break_on_hyphens=False)
            for block in blocks)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Never inside a word: "--batch-size" or "Loss-Attention" broken at a hyphen reads as
        # two words.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def terminal_width() -> int:
    """``shutil.get_terminal_size().columns`` (``$COLUMNS``, the terminal, else 80) without
    importing shutil and the compression modules it brings: a tenth of ``--help``'s time."""
    import os

    try:
        columns = int(os.environ.get("COLUMNS", ""))
        if columns > 0:
            return columns
    except ValueError:
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return 80


class Deferred:
    """A help text made only when help is shown: some need registries (the data sets, the
    heads' recipes) whose import costs seconds, which a command that runs need not pay."""

    def __init__(self, make: Callable[[], str]) -> None:
        self.make = make


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose :class:`Deferred` help texts are made when help is formatted
    (sub-command parsers are of this class too: argparse makes them of their parent's)."""

    def format_help(self) -> str:
        for action in self._actions:
            if isinstance(action.help, Deferred):
                action.help = action.help.make()
        return super().format_help()
