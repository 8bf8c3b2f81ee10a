"""The run store: one directory per run, and an SQLite index that is only a cache.

A run directory is a job folder (:mod:`engine.jobs`) that also holds::

    config.json      the resolved RunConfig (what was trained, exactly)
    status.json      state, reason, the trainer's process identity, progress (atomic rewrites)
    metrics.jsonl    one JSON line per finished epoch (appended, fsync'd)
    log.txt          the trainer's log; process.log: its raw stdout/stderr
    STOP             present while a stop is requested
    checkpoints/last.pt, checkpoints/best.pt   (written atomically)

States: ``created`` -> ``starting`` -> ``running`` -> ``finished`` | ``stopped`` | ``failed``. A run
whose status says running but whose process is gone is reported as ``failed`` ("process ended
unexpectedly") at once, and can be resumed from its last checkpoint.

The store's own files live outside the run namespace: a run name starts with a letter or digit,
and the store's files start with '.' or '_' (``.index.sqlite``, ``_sweeps/``, ``_mil/``,
``_bench/``). So no run name can collide with them. ``.index.sqlite`` (WAL mode) lists runs for
fast tables. :meth:`RunStore.rebuild_index` recreates it from the directories, and a missing or
damaged index is rebuilt automatically.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from engine.config import RUN_NAME_PATTERN, RunConfig, config_from_dict, config_to_dict
from engine.errors import RunError
from engine.fsutil import atomic_write, write_json_atomic
from engine.job_status import ACTIVE, State, Status, merge_status
from engine.jobs import Job
from engine.safe_io import METRICS_CAP, read_bytes, read_json

log = logging.getLogger(__name__)
INDEX_NAME = ".index.sqlite"
LEGACY_INDEX = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "index.sqlite-journal")
INDEX_VERSION = 2  # part of the table name: a new schema starts a fresh table


def default_runs_root() -> Path:
    return Path(os.environ.get("LOSSATTN_RUNS", "runs")).expanduser()


class Run:
    """A run directory. Reading never changes it; writers are the trainer and the store."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.job = Job(self.path, after_death="resume continues from the last checkpoint")

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def status_path(self) -> Path:
        return self.job.status_path

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def stop_path(self) -> Path:
        return self.job.stop_path

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint_dir / "best.pt"

    def peer_checkpoint(self, k: int) -> Path:
        """Peer ``k`` of a mutual-transfer run at its best epoch, as a standalone checkpoint."""
        return self.checkpoint_dir / f"peer{k}.pt"

    def peer_checkpoints(self) -> list[Path]:
        """The standalone peer checkpoints written so far (none for an ordinary run)."""
        found, k = [], 0
        while self.peer_checkpoint(k).is_file():
            found.append(self.peer_checkpoint(k))
            k += 1
        return found

    def config(self) -> RunConfig:
        try:
            data = read_json(self.config_path, "a run config")
            if isinstance(data, dict) and isinstance(data.get("data"), dict):
                # A run made before data.skip_unreadable existed skipped such images: it keeps
                # doing so (and now counts them) rather than failing on resume.
                data["data"].setdefault("skip_unreadable", True)
            return config_from_dict(RunConfig, data)
        except (OSError, json.JSONDecodeError) as exc:
            raise RunError(f"run {self.name}: cannot read {self.config_path}: {exc}") from exc
        except ValueError as exc:  # a config that parses but does not validate
            raise RunError(f"run {self.name}: {self.config_path} is not a valid run config: "
                           f"{exc}") from exc

    def config_dict(self) -> dict:
        """The config as plain JSON for tables ({} where unreadable; non-object sections are
        left out), without validating it."""
        try:
            data = read_json(self.config_path, "a run config")
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items()
                if k not in ("model", "data", "loss", "train", "transfer") or isinstance(v, dict)}

    def raw_status(self) -> Status:
        """The status file as written (:meth:`engine.jobs.Job.raw_status`); a run without one
        is failed."""
        status = self.job.raw_status()
        if status.missing:
            return Status(state=State.FAILED,
                          reason=f"{self.status_path} is missing; resume starts over")
        return status

    def status(self) -> Status:
        """The status, with a run whose process has gone reported as failed (or stopped)."""
        status = self.job.status()
        return self.raw_status() if status.missing else status

    def last_output_line(self) -> str:
        """Last non-empty line the process printed (a crash's error message)."""
        return self.job.last_output_line()

    def update_status(self, **fields: Any) -> Status:
        return self.job.update(**fields)

    def status_mtime(self) -> float:
        try:
            return self.status_path.stat().st_mtime
        except OSError:
            return 0.0

    def metrics(self) -> list[dict]:
        """Epoch rows; a torn last line (a kill mid-write) is ignored."""
        rows = []
        try:
            lines = read_bytes(self.metrics_path, METRICS_CAP, "a metrics log").splitlines()
        except OSError:
            return rows
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
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
        self.job.request_stop()

    def stop_requested(self) -> bool:
        return self.job.stop_requested()

    def summary(self) -> dict:
        """One row for tables and the index."""
        cfg, status = self.config_dict(), self.status()
        progress = status.fields
        model, data = cfg.get("model", {}), cfg.get("data", {})
        peers = [model, *[p for p in (cfg.get("transfer") or {}).get("peers", [])
                          if isinstance(p, dict)]]
        return {
            "name": self.name, "state": (status.state or State.FAILED).value,
            "reason": status.reason, "created": status.created or 0.0,
            "updated": status.updated or 0.0, "dataset": data.get("dataset", ""),
            # A mutual-transfer run shows every peer: "small_cnn + resnet18".
            "backbone": " + ".join(str(p.get("backbone", "")) for p in peers),
            "head": " + ".join(str(p.get("head", "")) for p in peers),
            "gamma_max": cfg.get("loss", {}).get("gamma_max"), "xi": model.get("xi"),
            "epochs": cfg.get("train", {}).get("epochs"),
            "epochs_done": progress.get("epochs_done", 0),
            "metric_name": progress.get("metric_name", ""),
            "best_metric": progress.get("best_metric"), "best_epoch": progress.get("best_epoch"),
            "last_metric": progress.get("last_metric"),
            "duration_s": progress.get("duration_s", 0.0),
            "pid": status.process.pid if status.process else None,
            "skipped": (progress.get("skipped_train") or 0) + (progress.get("skipped_test") or 0),
            "tags": [str(t) for t in cfg.get("tags", []) if isinstance(t, str)]
            if isinstance(cfg.get("tags"), list) else [],
            "status_mtime": self.status_mtime(),
        }


_COLUMNS = ("name", "state", "reason", "created", "updated", "dataset", "backbone", "head",
            "gamma_max", "xi", "epochs", "epochs_done", "metric_name", "best_metric",
            "best_epoch", "last_metric", "duration_s", "pid", "skipped", "tags", "status_mtime")


def _is_legacy_index(path: Path) -> bool:
    """Whether ``path`` is this project's old index (an SQLite file with table ``runs1``), and
    not someone else's file that happens to have the name."""
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            return bool(conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                                     "name='runs1'").fetchall())
    except sqlite3.Error:
        return False


class RunStore:
    """All runs under one root folder."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_runs_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / INDEX_NAME
        if _is_legacy_index(self.root / LEGACY_INDEX[0]):  # ours, from an older layout
            for legacy in LEGACY_INDEX:
                (self.root / legacy).unlink(missing_ok=True)

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
        merge_status(run.status_path, {"state": State.CREATED, "created": now})
        self.index(run)
        return run

    def delete(self, name: str) -> None:
        """Remove a run; a live run must be stopped first."""
        run = self.get(name)
        status = run.status()
        if status.state in ACTIVE:
            process = status.process
            raise RunError(f"run {name!r} is running"
                           + (f" (pid {process.pid})" if process else "") + "; stop it first")
        if status.state == State.QUEUED:  # out of the queue first: it must not start now
            run.job.stop()
        shutil.rmtree(run.path)
        self._execute(f"DELETE FROM runs{INDEX_VERSION} WHERE name = ?", (name,))

    def stop(self, name: str) -> bool:
        """Ask a running run to stop (stop file + SIGTERM to its verified trainer). Returns
        whether it was running; a stale or foreign pid is never signalled."""
        return self.get(name).job.stop()

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
            except sqlite3.OperationalError:
                raise  # locked or unopenable: busy now, not damaged; the callers fall back
            except sqlite3.DatabaseError:
                if attempt:
                    raise
                self._reset_index()  # a damaged cache is rebuilt, never trusted
        return []

    def _reset_index(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
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

    def index(self, run: Run, summary: dict | None = None) -> None:
        """Refresh a run's row (from ``summary`` when the caller has it). The index is a cache:
        trouble with it is logged, never raised (a trainer calls this on every status write).
        A damaged index is rebuilt; a locked or unopenable one is left for the next read."""
        try:
            try:
                self._upsert(run.summary() if summary is None else summary)
            except sqlite3.OperationalError:
                raise  # busy, not damaged: logged below
            except sqlite3.DatabaseError:
                self._reset_index()
        except (sqlite3.Error, OSError) as exc:
            log.warning("run index %s not updated (%s); it is rebuilt when next read",
                        self.index_path, exc)

    def rebuild_index(self) -> int:
        self._reset_index()
        return len(self.names())

    def list(self) -> list[dict]:
        """Rows of all runs, newest first, with live state (dead processes shown as failed).
        Without a usable index (locked, unopenable) the rows come from the folders."""
        try:
            return self._list_indexed()
        except (sqlite3.Error, OSError) as exc:
            log.warning("run index %s unusable (%s); reading the run folders", self.index_path,
                        exc)
            rows = [Run(self.root / name).summary() for name in self.names()]
            return sorted(rows, key=lambda r: r["created"] or 0.0, reverse=True)

    def _list_indexed(self) -> list[dict]:
        names = set(self.names())
        rows = self._rows()
        if set(rows) != names:  # runs added or removed behind the index's back: sync in place
            for name in names - set(rows):
                self._upsert(Run(self.root / name).summary())
            for name in set(rows) - names:
                self._execute(f"DELETE FROM runs{INDEX_VERSION} WHERE name = ?", (name,))
            rows = self._rows()
        out = []
        for name, row in rows.items():
            run = Run(self.root / name)
            if run.status_mtime() != row["status_mtime"]:  # a writer that did not index it
                summary = run.summary()
                self.index(run, summary)
                row = {**row, **summary}
            elif row["state"] in ACTIVE:  # the index may be stale about a dead process
                live = run.status()
                row["state"], row["reason"] = live.state.value, live.reason
            if isinstance(row["tags"], str):
                row["tags"] = json.loads(row["tags"] or "[]")
            out.append(row)
        return sorted(out, key=lambda r: r["created"] or 0.0, reverse=True)


def load_model_source(source: str | Path, runs_root: str | Path | None = None):
    """A checkpoint file, or the name of a run in the store at ``runs_root`` (its best
    checkpoint, else its last). Returns ``(model, checkpoint, run or None)``. Here, beside the
    store, so that the checkpoint module knows nothing of runs."""
    from engine.checkpoint import load_model  # torch: only when a model is loaded

    path = Path(source)
    if path.suffix == ".pt" or path.is_file():
        model, ckpt = load_model(path)
        return model, ckpt, None
    run = RunStore(runs_root).get(str(source))
    best = run.best_checkpoint if run.best_checkpoint.is_file() else run.last_checkpoint
    model, ckpt = load_model(best)
    return model, ckpt, run
