"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone gives 0600


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], *,
                 durable: bool = True) -> None:
    """Write via a temp file in the same folder, then rename over ``path``.

    ``durable``: fsync the file and its folder, so the new content survives a power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.",
                               suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def csv_text(rows: list[dict]) -> str:
    """Rows as CSV, with a column for every key any row has (in first-seen order), so that rows
    of different kinds (a sweep over heads with and without patches) share one table. Missing
    values and NaN / inf are empty cells."""
    import csv
    import io
    import math

    fields = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v)
                         for k, v in row.items()})
    return buffer.getvalue()


def write_json_atomic(path: str | Path, data: Any, *, durable: bool = True) -> None:
    """JSON via temp file + rename: a page polling ``path`` never reads half a file.
    ``durable=False`` skips the fsyncs, for files that are rewritten often."""
    atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=2, sort_keys=True).encode()),
                 durable=durable)


def remove_temp_files(folder: str | Path, *, older_than_s: float = 0.0,
                      recursive: bool = True) -> int:
    """Delete what interrupted :func:`atomic_write` calls left behind (``.NAME.XXXX.tmp``);
    returns the bytes freed. Call it only where no writer can be active, or with an age limit
    longer than any write takes."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    freed, now = 0, time.time()
    pattern = f"{TEMP_PREFIX}*{TEMP_SUFFIX}"
    for path in (folder.rglob(pattern) if recursive else folder.glob(pattern)):
        try:
            info = path.stat()
            if path.is_file() and now - info.st_mtime >= older_than_s:
                path.unlink()
                freed += info.st_size
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return freed


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed) for the body's duration, so
    that read-modify-write of a shared file by two processes never loses an update."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): writers are rare enough to go unlocked
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
