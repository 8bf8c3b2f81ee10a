"""The data roots: the folders that a data-folder field of the app may point into.

The command line reads any folder its user names: it runs as that user, on their machine. The app
is a server, and whoever opens it in a browser must not list, walk or train on the server's other
folders. So its data-folder fields take a folder *inside* one of these roots:

- ``$LOSSATTN_DATA``;
- ``./data`` (beside where the app was started);
- each folder in ``$LOSSATTN_DATA_ROOTS`` (separated by ``os.pathsep``, ':' on Linux): the
  setting for more.

Roots that do not exist are not offered. A path that leaves its root (absolute, ``..``, or a
symbolic link pointing out) is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import BinaryIO

from engine.errors import DataError
from engine.safe_io import open_bounded, read_bytes

ROOTS_ENV = "LOSSATTN_DATA_ROOTS"


@dataclass(frozen=True)
class DataRoot:
    label: str
    """How the app shows it: ``$LOSSATTN_DATA``, ``./data`` or ``$LOSSATTN_DATA_ROOTS[i]``."""
    path: Path
    """The resolved folder."""

    def show(self, path: str | Path) -> str:
        """``path`` as the app shows it: relative to this root, under its label."""
        try:
            rel = Path(path).resolve().relative_to(self.path)
        except ValueError:
            return str(path)
        return self.label if str(rel) == "." else f"{self.label}/{rel.as_posix()}"


def data_roots() -> list[DataRoot]:
    """The configured roots that exist, without duplicates, in the order listed above."""
    candidates = []
    if os.environ.get("LOSSATTN_DATA"):
        candidates.append(("$LOSSATTN_DATA", os.environ["LOSSATTN_DATA"]))
    candidates.append(("./data", "data"))
    extra = [p for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    candidates += [(f"${ROOTS_ENV}[{i}]", p) for i, p in enumerate(extra)]
    roots, seen = [], set()
    for label, text in candidates:
        path = Path(text).expanduser().resolve()
        if path.is_dir() and path not in seen:
            seen.add(path)
            roots.append(DataRoot(label, path))
    return roots


def folder_in_root(root: DataRoot, sub: str = "") -> Path:
    """``root``/``sub`` as a resolved folder, refusing anything outside the root."""
    sub = (sub or "").strip()
    if not sub:
        return root.path
    parts = PurePath(sub)
    if parts.is_absolute() or ".." in parts.parts or sub.startswith("~"):
        raise DataError(f"the sub-folder must be a path inside {root.label} (no '..', no "
                        f"absolute path); got {sub!r}")
    if any(ord(c) < 32 for c in sub):
        raise DataError(f"the sub-folder name holds control characters; got {sub!r:.80}")
    try:
        folder = (root.path / parts).resolve()
        inside, is_dir = folder.is_relative_to(root.path), folder.is_dir()
    except OSError as exc:  # a name too long, a loop of links, ...
        raise DataError(f"{root.label}/{sub[:80]} cannot be used: {exc.strerror or exc}") from None
    if not inside:
        raise DataError(f"{root.label}/{sub} leads outside {root.label} (a link?); refused")
    if not is_dir:
        raise DataError(f"{root.label}/{sub[:80]} is not a folder")
    return folder


def shown_relative(text: str, roots: list[DataRoot] | None = None) -> str:
    """``text`` (an error message) with every root's absolute path replaced by its label."""
    for root in sorted(roots if roots is not None else data_roots(),
                       key=lambda r: len(str(r.path)), reverse=True):
        text = text.replace(str(root.path), root.label)
    return text


# ----------------------------------------------------------------------------------------------
# Confinement at the moment of reading

CONFINE_ENV = "LOSSATTN_CONFINED_TO"
"""Set (to the resolved roots, ``os.pathsep``-separated) by the app's server at start. Then every
data file the process reads, and every job it starts (jobs inherit ``LOSSATTN_*`` variables),
must lie inside those folders, links followed. The CLI alone reads what its user names."""


def confine_reads_to(roots: list[DataRoot]) -> None:
    """From now on, this process and the jobs it starts read data only inside ``roots``.

    ``$LOSSATTN_DATA`` is made absolute too: jobs run in the project folder, and a relative
    value would name another folder there than the server's."""
    os.environ[CONFINE_ENV] = os.pathsep.join(str(r.path) for r in roots) or os.devnull
    if os.environ.get("LOSSATTN_DATA"):
        os.environ["LOSSATTN_DATA"] = str(Path(os.environ["LOSSATTN_DATA"]).expanduser()
                                          .resolve())


def confinement() -> list[Path] | None:
    """The folders data reads must stay in, or None where reads are not confined (the CLI)."""
    text = os.environ.get(CONFINE_ENV)
    if text is None:
        return None
    return [Path(p) for p in text.split(os.pathsep) if p.strip()]


def inside_roots(path: str | Path, folders: list[Path] | None = None) -> bool:
    """Whether ``path``, links followed, lies in one of ``folders`` (default: the confinement;
    True where there is none)."""
    folders = confinement() if folders is None else folders
    if folders is None:
        return True
    try:
        real = Path(path).resolve()
    except (OSError, RuntimeError):  # a loop of links (RuntimeError before Python 3.13)
        return False
    return any(real.is_relative_to(folder) for folder in folders)


def check_inside_roots(path: str | Path, what: str) -> Path:
    """``path`` unchanged where reads are not confined or it lies inside the roots; otherwise a
    DataError naming it. For folders (a class folder, a MIL set folder): files are checked
    where they are opened (:func:`open_data`)."""
    if not inside_roots(path):
        raise DataError(f"{what} {shown_relative(str(path))} leads outside the data roots "
                        "(a link?); refused")
    return Path(path)


def open_data(path: str | Path, cap: int, what: str) -> BinaryIO:
    """A data file opened for reading: a regular file within ``cap`` bytes, inside the roots
    where reads are confined (:func:`engine.safe_io.open_bounded`)."""
    return open_bounded(path, cap, what, confinement())


def read_data_bytes(path: str | Path, cap: int, what: str) -> bytes:
    """The whole of a data file, checked as :func:`open_data` checks it."""
    return read_bytes(path, cap, what, confinement())


def check_data_folder(folder: str | Path, what: str = "the data folder") -> None:
    """Where reads are confined, refuse a data folder (a run's recorded ``data.root``, or the
    folder a search found) that lies outside the roots, before anything below it is listed,
    naming the root the app would need."""
    if inside_roots(folder):
        return
    labels = ", ".join(r.label for r in data_roots()) or "none exists"
    raise DataError(f"{what} {folder} is outside the app's data roots ({labels}); to use it, "
                    f"start the app with {ROOTS_ENV} set to it (or to a folder above it), or "
                    "move the data into a data root")


def confinement_tag() -> str:
    """A mark for what a confined process caches, so that it never serves what an unconfined
    one decoded (from a link that leads outside the roots, say): '' where reads are free."""
    folders = confinement()
    if folders is None:
        return ""
    import hashlib

    return "-c" + hashlib.sha1(os.pathsep.join(map(str, folders)).encode()).hexdigest()[:8]
