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

from engine.errors import DataError

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
