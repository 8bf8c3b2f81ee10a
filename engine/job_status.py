"""A job's status: the :class:`State` enum and the versioned :class:`Status`, and the one place
that reads and writes ``status.json``.

The file is a JSON object::

    version    2 (a file written before the version existed has none: it reads as version 1)
    state      one of State's values
    reason     why it is in that state (an error, "stopped on request", "waiting for a slot")
    process    {"pid", "create_time", "host"} of its process (engine.job_process), or null
    kind       what the job is ("sweep", "mil", "bench"; a run's status has none)
    created, updated, queued, launched, started, finished   times (seconds since the epoch)
    ...        the job's own progress fields: a run's epoch, step, images_per_s, best_metric;
               a MIL experiment's task, tasks, fraction, current; a sweep's cells, executor

Why the progress fields are one mapping, :attr:`Status.fields`, and not attributes: the job
layer never interprets them. They belong to the code that runs the job (the trainer, the MIL
protocol, the sweep), each kind has its own, and the trainer adds new ones as it grows
(``threads_from``, ``data_on_device``); a class per kind would tie this module to all of them
and make every new field a change here. What the job layer itself reads (state, reason,
process, kind and the times) is typed. The progress fields are still checked on read where
their type is known (:data:`NUMBER_FIELDS`, ...), so a malformed one is named, not trusted.

Reading never fails: a missing file is a Status with no state (:attr:`Status.missing`), an
unreadable or malformed one reads as ``failed`` with the reason (only a bad state or process
identity fails the job; a bad progress field is dropped and named). A file written by the
previous version (no ``version``, a bare ``pid``) reads too.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from engine.fsutil import write_json_atomic
from engine.job_process import ProcessIdentity, is_number
from engine.safe_io import read_json

STATUS_VERSION = 2
"""The version this module writes. 1: the files written before the field existed."""
LEGACY_VERSION = 1


class State(enum.StrEnum):
    """Where a job is: ``created`` -> (``queued``) -> ``starting`` -> ``running`` ->
    ``finished`` | ``stopped`` | ``failed``. A StrEnum: ``State.RUNNING == "running"``."""

    CREATED = "created"
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"


STATES = tuple(State)
ACTIVE = frozenset({State.STARTING, State.RUNNING})
"""A process is (or is about to be) at work on the job."""
LIVE = ACTIVE | {State.QUEUED}
"""Active, or waiting in the queue to be: the job may not be started again, and Stop applies."""
ENDED = frozenset({State.FINISHED, State.STOPPED, State.FAILED})

TIME_FIELDS = ("created", "updated", "queued", "launched", "started", "finished")
NUMBER_FIELDS = (*TIME_FIELDS, "duration_s", "eta_s", "images_per_s", "best_metric",
                 "last_metric", "fraction", "seconds")
INT_FIELDS = ("epochs", "epochs_done", "epoch", "step", "steps", "best_epoch", "task", "tasks",
              "cells", "world", "params", "train_images", "test_images", "cpu_threads",
              "skipped_train", "skipped_test")
TEXT_FIELDS = ("reason", "metric_name", "device", "command", "current", "kind", "warning",
               "executor", "ray_task")
_TYPED = ("version", "state", "reason", "process", "kind", *TIME_FIELDS)
"""The keys that are attributes of :class:`Status`; every other key is a progress field."""


@dataclass(frozen=True)
class Status:
    """A job's status as read (see the module docstring); build one with :func:`parse_status`
    or :func:`read_status`, change one with :func:`dataclasses.replace`."""

    state: State | None = None
    """None only when the job folder has no status file (nothing was ever started there)."""
    reason: str = ""
    process: ProcessIdentity | None = None
    kind: str | None = None
    created: float | None = None
    updated: float | None = None
    queued: float | None = None
    launched: float | None = None
    started: float | None = None
    finished: float | None = None
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The job's own progress fields (read-only)."""
    version: int = STATUS_VERSION
    """The version of the file it was read from (:data:`LEGACY_VERSION` for an old one)."""

    def __post_init__(self) -> None:
        if self.state is not None and not isinstance(self.state, State):
            object.__setattr__(self, "state", State(self.state))
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))

    @property
    def missing(self) -> bool:
        """No status file: the job was never created."""
        return self.state is None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def live(self) -> bool:
        """Active or queued."""
        return self.state in LIVE

    def to_dict(self) -> dict:
        """The JSON object of the file (the current version); the times and ``kind`` only
        where set, the progress fields as they are."""
        out: dict[str, Any] = {"version": STATUS_VERSION}
        if self.state is not None:
            out["state"] = self.state.value
        out["reason"] = self.reason
        out["process"] = None if self.process is None else self.process.to_dict()
        if self.kind is not None:
            out["kind"] = self.kind
        out.update({k: getattr(self, k) for k in TIME_FIELDS if getattr(self, k) is not None})
        out.update(self.fields)
        return out


def check_status(data: Any, where: str) -> tuple[dict, list[str]]:
    """The fields of a status object that have the right type, and a message per bad field.

    ``where`` names the file in the messages. A legacy bare ``pid`` (no creation time) cannot be
    verified, so it is dropped: such a process is never signalled."""
    if not isinstance(data, dict):
        return {}, [f"{where} must hold a JSON object"]
    good, problems = {}, []
    for key, value in data.items():
        problem = _field_problem(key, value)
        if problem:
            problems.append(f"{where}: field {key!r} {problem}; got {value!r:.60}")
        elif key != "pid":
            good[key] = value
    return good, problems


def _field_problem(key: str, value: Any) -> str | None:
    if value is None:
        return "must be set" if key == "state" else None
    if key == "state":
        return None if value in STATES else f"must be one of {list(STATES)}"
    if key == "version":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        return None if ok else "must be an int >= 1"
    if key == "process":
        try:
            ProcessIdentity.parse(value)
        except ValueError as exc:
            return str(exc)
        return None
    if key in NUMBER_FIELDS and not is_number(value):
        return "must be a number"
    if key in INT_FIELDS and not (isinstance(value, int) and not isinstance(value, bool)):
        return "must be an int"
    if key in TEXT_FIELDS and not isinstance(value, str):
        return "must be text"
    return None


def parse_status(data: Any, where: str) -> Status:
    """The status a status object says, without its malformed fields, which the reason names.

    Only a malformed ``state`` or process identity makes the job ``failed`` (a process that
    cannot be verified is never the job's): a bad progress field (written by another version,
    say) must not hide a live job from Stop, nor let a second process start on its folder."""
    good, problems = check_status(data, where)
    if problems:
        note = "; ".join(problems)
        unverifiable = (isinstance(data, dict) and data.get("process") is not None
                        and "process" not in good)
        if good.get("state") is None or unverifiable:
            good["state"] = State.FAILED
            good.pop("process", None)
        good["reason"] = f"{good['reason']}; {note}" if good.get("reason") else note
    return Status(
        state=good.get("state"), reason=good.get("reason") or "",
        process=ProcessIdentity.parse(good.get("process")), kind=good.get("kind"),
        **{k: None if good.get(k) is None else float(good[k]) for k in TIME_FIELDS},
        fields={k: v for k, v in good.items() if k not in _TYPED},
        version=good.get("version", LEGACY_VERSION))


def read_status(path: Path) -> Status:
    """The status file at ``path`` (see :func:`parse_status`); a missing one is
    :attr:`Status.missing`, an unreadable one ``failed`` with the reason."""
    try:
        data = read_json(path, "a job status")
    except FileNotFoundError:
        return Status()
    except (OSError, ValueError) as exc:
        return Status(state=State.FAILED, reason=f"{path} is unreadable ({exc})")
    return parse_status(data, str(path))


def load_status(path: Path) -> Status:
    """The status file at ``path``, for a caller that must tell an unreadable file apart:
    raises OSError (FileNotFoundError when missing), ValueError when it is not JSON, and
    TypeError when it is not a JSON object."""
    data = read_json(path, "a job status")
    if not isinstance(data, dict):
        raise TypeError(f"{path} must hold a JSON object")
    return parse_status(data, str(path))


def read_state(path: Path) -> State | None:
    """The ``state`` of the status file at ``path`` as written (None if unreadable, missing or
    not a state): what the queue needs, without judging the process."""
    try:
        data = read_json(path, "a job status")
    except (OSError, ValueError):
        return None
    state = data.get("state") if isinstance(data, dict) else None
    return State(state) if state in STATES else None


def merge_status(path: Path, fields: Mapping[str, Any]) -> Status:
    """Merge ``fields`` into the status file at ``path`` and write it (atomic; the caller holds
    the job's lock); returns the status as written. The file keeps every key it had (a
    field this version does not know is kept), takes ``fields``, the time (``updated``) and
    :data:`STATUS_VERSION`. A legacy bare ``pid`` is dropped: it is never trusted again.
    NaN and inf are written as null (JSON has no such numbers; a metric can be NaN).

    ``state`` must be a :class:`State` (or its value): a writer's mistake there would make the
    job read as failed, so it raises ValueError naming the field instead. ``process`` is a
    :class:`ProcessIdentity` (or its dict, or None; a malformed dict is written as it is and
    read as failed, never trusted)."""
    try:
        current = read_json(path, "a job status")
    except (OSError, ValueError):
        current = {}
    if not isinstance(current, dict):
        current = {}
    current.pop("pid", None)
    new = {k: _json_value(k, v) for k, v in fields.items()}
    data = {**current, **new, "updated": time.time(), "version": STATUS_VERSION}
    write_json_atomic(path, data)
    return parse_status(data, str(path))


def _json_value(key: str, value: Any) -> Any:
    if key == "state":
        if value not in STATES:
            raise ValueError(f"status field 'state' must be one of {list(STATES)}; "
                             f"got {value!r:.60}")
        return State(value).value
    if isinstance(value, ProcessIdentity):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    return None if isinstance(value, float) and not math.isfinite(value) else value
