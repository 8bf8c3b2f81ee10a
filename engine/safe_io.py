"""Bounded reads: every file the project reads from a run store, a data folder or a config is a
regular file, no bigger than the cap for its kind, opened without blocking, and (where asked)
inside given folders.

Why each rule:

- A ``status.json`` that was a link to an endless device made ``runs list`` grow to 17.7 GB:
  so a size cap, checked on the open file, and a read that stops one byte past it.
- A FIFO named like an image hung the loader forever: so ``O_NONBLOCK`` at open (opening a FIFO
  for reading then returns at once) and a regular-file check before any read.
- A link below a data folder led outside every data root: so the folder check is made on the
  file actually opened (``/proc/self/fd``), not on the name a moment before.

Every refusal is a :class:`~engine.errors.FileRefused`, an ``OSError``: code that already
handles an unreadable file handles these the same way, and the message names the file, what it
was read as, and the size or kind that was refused.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from engine.errors import FileRefused

KiB, MiB, GiB = 2**10, 2**20, 2**30

JSON_CAP = 16 * MiB
"""A run's ``status.json`` / ``config.json`` / ``spawn.json``, a sweep's grid, a results file,
a config given to the CLI: a few KB each; 16 MB leaves room for long histories."""
METRICS_CAP = 256 * MiB
"""A run's ``metrics.jsonl`` (one line per evaluation or logging step)."""
ANNOTATION_CAP = 2 * GiB
"""A COCO instances file (``instances_train2017.json`` is 448 MB)."""
IMAGE_CAP = 256 * MiB
"""One image file of a data set (a 40-megapixel 16-bit RGBA TIFF is 320 MB; such a file is
refused by the pixel limit anyway)."""
BATCH_CAP = 1 * GiB
"""A CIFAR python batch (31 MB) or an SVHN ``.mat`` (182 MB for ``train_32x32.mat``)."""
MAT_CAP = 1 * GiB
"""A MIL ``.mat`` file."""
TABLE_CAP = 256 * MiB
"""A text table (a MIL set's CSV, Tiny ImageNet's box lists)."""
CHECKPOINT_CAP = 8 * GiB
"""A checkpoint (a ResNet18 with optimizer state is about 400 MB)."""

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def show_size(size: int) -> str:
    return f"{size / GiB:.1f} GB" if size >= GiB else (
        f"{size / MiB:.1f} MB" if size >= MiB else f"{size:,} bytes")


def opened_path(fd: int, path: Path) -> Path:
    """Where the open file ``fd`` really is (links followed as the kernel followed them), or
    ``path`` resolved where ``/proc`` is not there."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return path.resolve()


def open_bounded(path: str | Path, cap: int, what: str,
                 inside: Sequence[Path] | None = None) -> BinaryIO:
    """``path`` opened for binary reading, after checking that it is a regular file of at most
    ``cap`` bytes and, when ``inside`` is given, that it lies in one of those (resolved)
    folders. Raises :class:`FileRefused` naming the file, or the ``OSError`` of the open itself
    (missing, no permission).

    The checks are made twice: on the name before opening (so a file outside ``inside`` is
    neither opened nor described, and no device is ever opened: opening one can act, as a tape
    rewinds), and on the open descriptor after (so a link swapped in between is caught)."""
    path = Path(path)
    if inside is not None:
        try:
            real = path.resolve()
        except (OSError, RuntimeError):  # a loop of links (RuntimeError before Python 3.13)
            raise FileRefused(f"{path} is a loop of links; refused") from None
        _check_inside(real, inside, path)
    _check_kind(os.stat(path), path, cap, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        _check_kind(os.fstat(fd), path, cap, what)
        if inside is not None:
            _check_inside(opened_path(fd, path), inside, path)
        if hasattr(os, "O_NONBLOCK"):  # a regular file: back to plain blocking reads
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_kind(info: os.stat_result, path: Path, cap: int, what: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise FileRefused(f"{path} is {kind_of(info.st_mode)}, not a file; refusing to read it "
                          f"as {what}")
    if info.st_size > cap:
        raise FileRefused(f"{path} is {show_size(info.st_size)}; {what} may be at most "
                          f"{show_size(cap)}")


def _check_inside(real: Path, inside: Sequence[Path], path: Path) -> None:
    if not any(real.is_relative_to(folder) for folder in inside):
        raise FileRefused(f"{path} leads outside the data roots (a link?); refused")


def read_bytes(path: str | Path, cap: int, what: str,
               inside: Sequence[Path] | None = None) -> bytes:
    """The whole of ``path`` (see :func:`open_bounded`), never more than ``cap`` bytes even if
    the file grows while it is read."""
    with open_bounded(path, cap, what, inside) as fh:
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise FileRefused(f"{path} grew past {show_size(cap)} while it was read as {what}")
    return data


def read_text(path: str | Path, cap: int, what: str,
              inside: Sequence[Path] | None = None) -> str:
    """:func:`read_bytes` decoded as UTF-8; bytes that are not UTF-8 are a ``ValueError``
    naming the file."""
    data = read_bytes(path, cap, what, inside)
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({what}): byte {exc.start}") from None


def read_json(path: str | Path, what: str = "a JSON file", cap: int = JSON_CAP) -> Any:
    """A JSON file read within ``cap``. Bad JSON raises ``json.JSONDecodeError`` as
    ``json.loads`` does, so callers' handling of a damaged file stays as it was."""
    return json.loads(read_bytes(path, cap, what))


def read_tail(path: str | Path, what: str, max_bytes: int = 64 * KiB) -> str:
    """The last ``max_bytes`` of a log that may be any size (only its end is read), as text;
    a regular file only (see :func:`open_bounded`)."""
    import sys

    with open_bounded(path, sys.maxsize, what) as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - max_bytes))
        return fh.read(max_bytes).decode(errors="replace")
