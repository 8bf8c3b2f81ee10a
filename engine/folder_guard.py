"""A run folder removed under its trainer (issue 30): the trainer notices before and after each
write, ends as failed, and never leaves the folder made again half empty.

Atomic writes make their parent folders, so one write into a folder removed meanwhile would
recreate it without its config, hidden from ``runs list``. :class:`FolderGuard` remembers the
folder's identity (device, inode) and holds it open, so that a folder made again at the path
never passes for the old one by reusing its inode.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Self

from engine.errors import RunError
from engine.fsutil import TEMP_PREFIX, TEMP_SUFFIX, remove_temp_files
from engine.job_status import Status, load_status


class RunFolderRemoved(RunError):
    """The run's folder was removed (or replaced) while its trainer ran."""


TRAINER_FILES = ("status.json", ".lock", "metrics.jsonl")
"""What the trainer's writes make in a run folder by themselves (besides checkpoints/)."""


class FolderGuard:
    """The run folder as the trainer found it (its device and inode). Atomic writes make their
    parent folders, so a write into a folder removed under the trainer would recreate it half
    empty (no config): :meth:`check` before and after each write notices the removal first,
    and takes back a folder that the write itself recreated meanwhile.

    The guard holds the folder open until :meth:`close`: a removed folder's inode then stays
    taken, so a folder made again at the path never passes for the old one by reusing it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._held: int | None = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY",
                                                                              0))
        except OSError:  # gone already, or a system that cannot open folders: by name only
            self._held = None
        self.identity = self._identity()

    def close(self) -> None:
        if self._held is not None:
            os.close(self._held)
            self._held = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _identity(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_dev, info.st_ino

    def intact(self) -> bool:
        return self.identity is not None and self._identity() == self.identity

    def check(self) -> None:
        """Raise :class:`RunFolderRemoved` unless the folder is the one the trainer began in."""
        if not self.intact():
            self._take_back()
            raise RunFolderRemoved(f"run folder removed: {self.path} was removed while its "
                                   "trainer ran; the run ends as failed, and nothing more is "
                                   "written there")

    @contextlib.contextmanager
    def writing(self):
        """Around a write into the folder: checked before, and after (a removal during it)."""
        self.check()
        yield
        self.check()

    def _take_back(self) -> None:
        """Remove a folder at the path that only this trainer's writes made (no config, no
        ``created`` status, nothing but the trainer's files): never someone else's run."""
        path, checkpoints = self.path, self.path / "checkpoints"
        if not path.is_dir() or self._identity() == self.identity or not _only_trainer_files(path):
            return
        remove_temp_files(path)
        for name in TRAINER_FILES:
            (path / name).unlink(missing_ok=True)
        for ckpt in checkpoints.glob("*.pt"):
            ckpt.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # something else is in it: leave it
            if checkpoints.is_dir():
                checkpoints.rmdir()
            path.rmdir()


def _only_trainer_files(path: Path) -> bool:
    """Whether ``path`` holds nothing but what a trainer's writes leave (see FolderGuard)."""
    try:  # a write under way counts as the file it makes: a new run's config.json is not ours
        names = {_written(p.name) for p in path.iterdir()}
        ckpts = {_written(p.name) for p in (path / "checkpoints").glob("*")}
        status = load_status(path / "status.json") if (
            path / "status.json").is_file() else Status()
    except (OSError, ValueError, TypeError):
        return False
    return (names <= {*TRAINER_FILES, "checkpoints"} and all(n.endswith(".pt") for n in ckpts)
            and status.created is None)


def _written(name: str) -> str:
    """The file an atomic write's temp file (``.NAME.XXXX.tmp``) will become; other names as
    they are."""
    if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
        return name[len(TEMP_PREFIX):-len(TEMP_SUFFIX)].rpartition(".")[0] or name
    return name
