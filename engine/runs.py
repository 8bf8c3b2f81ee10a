"""The run store: one directory per run, and an SQLite index that is only a cache.

A run directory holds::

    config.json      the resolved RunConfig (what was trained, exactly)
    status.json      state, reason, pid, progress (rewritten atomically)
    metrics.jsonl    one JSON line per finished epoch (appended, fsync'd)
    log.txt          the trainer's log
    STOP             present while a stop is requested
    checkpoints/last.pt, checkpoints/best.pt   (written atomically)

States: ``created`` -> ``running`` -> ``finished`` | ``stopped`` | ``failed``. A run whose status
says running but whose process is gone is reported as ``failed`` ("process ended unexpectedly")
and can be resumed from its last checkpoint.

``index.sqlite`` (WAL mode) lists runs for fast tables; :meth:`RunStore.rebuild_index` recreates it
from the directories, and a missing or damaged index is rebuilt automatically.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from engine.config import RUN_NAME_PATTERN, RunConfig, config_from_dict, config_to_dict
from engine.fsutil import atomic_write

STATES = ("created", "running", "stopped", "finished", "failed")
ACTIVE_STATES = ("created", "running")
INDEX_VERSION = 1  # part of the table name: a new schema starts a fresh table


class RunError(ValueError):
    """A run operation cannot be done; the message says why."""


def default_runs_root() -> Path:
    return Path(os.environ.get("LOSSATTN_RUNS", "runs")).expanduser()


def write_json_atomic(path: Path, data: Any, *, durable: bool = True) -> None:
    """JSON via temp file + rename: a page polling ``path`` never reads half a file.
    ``durable=False`` skips the fsyncs, for files that are rewritten often."""
    atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=2, sort_keys=True).encode()),
                 durable=durable)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


class Run:
    """A run directory. Reading never changes it; writers are the trainer and the store."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def stop_path(self) -> Path:
        return self.path / "STOP"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint_dir / "best.pt"

    def config(self) -> RunConfig:
        try:
            return config_from_dict(RunConfig, json.loads(self.config_path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunError(f"run {self.name}: cannot read {self.config_path}: {exc}") from exc

    def config_dict(self) -> dict:
        try:
            return json.loads(self.config_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def raw_status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {"state": "failed", "reason": "status.json is missing or unreadable"}

    def status(self) -> dict:
        """The status, with a dead 'running' process reported as failed."""
        status = self.raw_status()
        starting = status.get("reason") == "starting" and time.time() - status.get(
            "launched", 0.0) < 60.0  # pid not recorded yet
        if status.get("state") == "running" and not starting and not pid_alive(status.get("pid")):
            last = self.last_output_line()
            status = {**status, "state": "failed",
                      "reason": "process ended unexpectedly" + (f": {last}" if last else
                                                                " (killed?)")
                                + "; resume continues from the last checkpoint"}
        return status

    def last_output_line(self) -> str:
        """Last non-empty line the process printed (a crash's error message)."""
        try:
            with open(self.path / "process.log", "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 4096))
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return next((ln.strip() for ln in reversed(lines) if ln.strip()), "")

    def update_status(self, **fields: Any) -> dict:
        status = {**self.raw_status(), **fields, "updated": time.time()}
        write_json_atomic(self.status_path, status)
        return status

    def status_mtime(self) -> float:
        try:
            return self.status_path.stat().st_mtime
        except OSError:
            return 0.0

    def metrics(self) -> list[dict]:
        """Epoch rows; a torn last line (a kill mid-write) is ignored."""
        rows = []
        try:
            lines = self.metrics_path.read_text().splitlines()
        except OSError:
            return rows
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def keep_metrics_before(self, epoch: int) -> None:
        """Drop rows of epochs >= ``epoch`` (they will be trained again after a resume)."""
        rows = [r for r in self.metrics() if r.get("epoch", 0) < epoch]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write(self.metrics_path, lambda fh: fh.write(text.encode()))

    def request_stop(self) -> None:
        self.stop_path.touch()

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    def summary(self) -> dict:
        """One row for tables and the index."""
        cfg, status = self.config_dict(), self.status()
        model, data = cfg.get("model", {}), cfg.get("data", {})
        return {
            "name": self.name, "state": status.get("state", "failed"),
            "reason": status.get("reason", ""), "created": status.get("created", 0.0),
            "updated": status.get("updated", 0.0), "dataset": data.get("dataset", ""),
            "backbone": model.get("backbone", ""), "head": model.get("head", ""),
            "gamma_max": cfg.get("loss", {}).get("gamma_max"), "xi": model.get("xi"),
            "epochs": cfg.get("train", {}).get("epochs"),
            "epochs_done": status.get("epochs_done", 0),
            "metric_name": status.get("metric_name", ""),
            "best_metric": status.get("best_metric"), "best_epoch": status.get("best_epoch"),
            "last_metric": status.get("last_metric"),
            "duration_s": status.get("duration_s", 0.0), "pid": status.get("pid"),
            "tags": list(cfg.get("tags", [])), "status_mtime": self.status_mtime(),
        }


_COLUMNS = ("name", "state", "reason", "created", "updated", "dataset", "backbone", "head",
            "gamma_max", "xi", "epochs", "epochs_done", "metric_name", "best_metric",
            "best_epoch", "last_metric", "duration_s", "pid", "tags", "status_mtime")


class RunStore:
    """All runs under one root folder."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_runs_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / "index.sqlite"

    # -- runs -------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if not isinstance(name, str) or not re.fullmatch(RUN_NAME_PATTERN, name):
            raise RunError(f"invalid run name {name!r}: use 1-80 letters, digits, '.', '_' or "
                           "'-', starting with a letter or digit (no paths)")
        return self.root / name

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and (p / "config.json").is_file())

    def exists(self, name: str) -> bool:
        return (self._path(name) / "config.json").is_file()

    def get(self, name: str) -> Run:
        path = self._path(name)
        if not (path / "config.json").is_file():
            known = self.names()
            raise RunError(f"no run named {name!r} in {self.root}"
                           + (f"; runs: {known[:20]}" if known else " (no runs yet)"))
        return Run(path)

    def unique_name(self, base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]", "-", base)[:64].strip("-._") or "run"
        name, n = base, 1
        while self._path(name).exists():
            n += 1
            name = f"{base}-{n}"
        return name

    def create(self, config: RunConfig) -> Run:
        """Make the run directory with its config; an existing name is an error."""
        if config.name is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            config.name = self.unique_name(f"{config.data.dataset}-{config.model.backbone}-"
                                           f"{config.model.head}-{stamp}".replace(":", "-"))
        path = self._path(config.name)
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            raise RunError(f"a run named {config.name!r} already exists in {self.root}; choose "
                           "another name or resume it") from None
        run = Run(path)
        run.checkpoint_dir.mkdir()
        write_json_atomic(run.config_path, config_to_dict(config))
        now = time.time()
        write_json_atomic(run.status_path, {"state": "created", "created": now, "updated": now})
        self.index(run)
        return run

    def delete(self, name: str) -> None:
        """Remove a run; a live run must be stopped first."""
        run = self.get(name)
        status = run.status()
        if status.get("state") == "running":
            raise RunError(f"run {name!r} is running (pid {status.get('pid')}); stop it first")
        shutil.rmtree(run.path)
        self._execute(f"DELETE FROM runs{INDEX_VERSION} WHERE name = ?", (name,))

    def stop(self, name: str) -> bool:
        """Ask a running run to stop (stop file + SIGTERM). Returns whether it was running."""
        run = self.get(name)
        status = run.status()
        if status.get("state") != "running":
            return False
        run.request_stop()
        try:
            os.kill(int(status["pid"]), signal.SIGTERM)
        except (ProcessLookupError, KeyError, TypeError, ValueError):
            pass
        return True

    # -- index ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.index_path, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute(f"CREATE TABLE IF NOT EXISTS runs{INDEX_VERSION} "
                     f"({', '.join(_COLUMNS)}, PRIMARY KEY (name))")
        return conn

    def _execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        for attempt in (0, 1):
            try:
                with closing(self._connect()) as conn, conn:
                    return conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError:
                if attempt:
                    raise
                self._reset_index()  # a damaged cache is rebuilt, never trusted
        return []

    def _reset_index(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.index_path}{suffix}").unlink(missing_ok=True)
        with closing(self._connect()):
            pass
        for name in self.names():
            self._upsert(Run(self.root / name).summary())

    def _upsert(self, row: dict) -> None:
        row = {**row, "tags": json.dumps(row.get("tags", []))}
        placeholders = ", ".join("?" for _ in _COLUMNS)
        with closing(self._connect()) as conn, conn:
            conn.execute(f"INSERT OR REPLACE INTO runs{INDEX_VERSION} ({', '.join(_COLUMNS)}) "
                         f"VALUES ({placeholders})", tuple(row.get(c) for c in _COLUMNS))

    def _rows(self) -> dict[str, dict]:
        return {r[0]: dict(zip(_COLUMNS, r, strict=True))
                for r in self._execute(f"SELECT {', '.join(_COLUMNS)} FROM runs{INDEX_VERSION}")}

    def index(self, run: Run) -> None:
        try:
            self._upsert(run.summary())
        except sqlite3.DatabaseError:
            self._reset_index()

    def rebuild_index(self) -> int:
        self._reset_index()
        return len(self.names())

    def list(self) -> list[dict]:
        """Rows of all runs, newest first, with live state (dead processes shown as failed)."""
        names = set(self.names())
        rows = self._rows()
        if set(rows) != names:  # runs added or removed behind the index's back
            self.rebuild_index()
            rows = self._rows()
        for name, row in rows.items():  # status changed by a writer that did not index it
            if Run(self.root / name).status_mtime() != row["status_mtime"]:
                self.index(Run(self.root / name))
                rows[name] = {**row, **Run(self.root / name).summary()}
        out = []
        for row in rows.values():
            if isinstance(row["tags"], str):
                row["tags"] = json.loads(row["tags"] or "[]")
            if row["state"] == "running":  # the index may be stale about a dead process
                live = Run(self.root / row["name"]).status()
                row["state"], row["reason"] = live.get("state"), live.get("reason", "")
            out.append(row)
        return sorted(out, key=lambda r: r["created"] or 0.0, reverse=True)
