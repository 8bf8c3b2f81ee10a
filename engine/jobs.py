"""Background jobs: one folder per job, started, watched and stopped by this module alone.

Training runs, sweeps, MIL experiments and benchmarks all run in processes of their own, so
that they outlive the app's script reruns and a closed tab. Each has a job folder::

    status.json   state, reason, the process's identity, and the job's own progress fields
    process.log   the process's stdout and stderr (a crash before logging starts is on record)
    STOP          present while a stop is requested
    .lock         serialises read-modify-write of status.json between the job and its starter

plus whatever the job itself writes (a run's config and checkpoints, a sweep's report, ...).

States: ``created`` -> (``queued``) -> ``starting`` -> ``running`` -> ``finished`` | ``stopped`` |
``failed``. A job that computes holds one of its run store's slots (:mod:`engine.slots`): when
``$LOSSATTN_MAX_JOBS`` are held, :meth:`Job.spawn` leaves it ``queued`` (its start spec in
``spawn.json``) and :func:`dispatch` starts it, oldest first, when a slot frees.

Process identity: a pid alone is not a process. A pid is recycled once its process has ended,
so a stale pid in a status file may name an unrelated process. A job therefore records its
process as (pid, creation time). A process counts as the job's only while both match, and no
signal is ever sent otherwise (nor to pid <= 1). The starter records the identity the moment the
child exists, so a job whose process is gone shows as ended at the next look.

Stopping: the STOP file, then SIGTERM to the verified process. A job's process installs its
SIGTERM handler before it marks itself running (:meth:`Job.attach`), and checks the STOP file
right after. So a stop during start-up always ends as ``stopped``. A process killed before its
handler existed is shown as stopped when a stop was requested, and as failed otherwise.

Processes on other machines (a Ray cell or a torchrun rank 0 on another node, writing to a run
store every node mounts): the identity also records the host. From any other host such a
process is never signalled (a STOP file is the only way to ask it), and it counts as alive while
its status file is younger than ``REMOTE_STALE_S`` (the heartbeat: a training run writes its
status at least once a second while it steps).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import JobError
from engine.fsutil import locked, write_json_atomic
from engine.safe_io import read_json, read_tail
from engine.slots import (
    Slots,
    environment_for,
    job_environment,
    job_limit,
    job_state,
    store_root_of,
    this_host,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
JOB_ENV = "LOSSATTN_JOB_DIR"
"""Set in a spawned process's environment: the job folder it belongs to."""
STATES = ("created", "queued", "starting", "running", "finished", "stopped", "failed")
ACTIVE = ("starting", "running")
START_GRACE_S = 30.0
"""How long a job may say ``starting`` with no process recorded (its starter died mid-start)."""
_CREATE_TIME_TOLERANCE_S = 1.0
REMOTE_STALE_S = 600.0
"""A process on another host whose job's status has not changed for this long counts as gone
(long enough for an evaluation pass over a large test set, which writes no status)."""


class JobStopped(BaseException):  # a control-flow signal, like KeyboardInterrupt
    """Raised in a job's main thread by SIGTERM (or a STOP file) outside cooperative loops."""


# ----------------------------------------------------------------------------------------------
# Process identity


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as (pid, creation time, host): survives pid reuse. ``host`` is None in status
    files written before hosts were recorded (taken as this host, as they always were)."""

    pid: int
    create_time: float
    host: str | None = None

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of the live process ``pid`` now (None if there is none)."""
        import psutil

        if not _valid_pid(pid):
            return None
        try:
            return cls(pid, psutil.Process(pid).create_time(), this_host())
        except psutil.Error:
            return None

    @classmethod
    def current(cls) -> ProcessIdentity:
        identity = cls.of(os.getpid())
        assert identity is not None
        return identity

    @classmethod
    def parse(cls, value: Any) -> ProcessIdentity | None:
        """From a status file's ``process`` field; ``None`` stays None. Raises ValueError."""
        if value is None:
            return None
        ok = (isinstance(value, dict) and _valid_pid(value.get("pid"))
              and _is_number(value.get("create_time"))
              and isinstance(value.get("host"), str | None))
        if not ok:
            raise ValueError("must be {'pid': an int > 1, 'create_time': a number, "
                             "'host': a name or absent}")
        return cls(int(value["pid"]), float(value["create_time"]), value.get("host"))

    def to_dict(self) -> dict:
        return {"pid": self.pid, "create_time": self.create_time, "host": self.host}

    @property
    def remote(self) -> bool:
        """On another machine: its pid means nothing here."""
        return self.host is not None and self.host != this_host()

    def _process(self):
        """The psutil process if it is still this one (not a zombie, pid not reused)."""
        import psutil

        if self.remote:
            return None
        try:
            proc = psutil.Process(self.pid)
            same = self.matches(ProcessIdentity(self.pid, proc.create_time()))
            if not same or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self._process() is not None

    def matches(self, other: ProcessIdentity | None) -> bool:
        """The same process (creation times compared within the clock tolerance; hosts where
        both are known)."""
        same_host = self.host is None or other is None or other.host is None or (
            self.host == other.host)
        return other is not None and same_host and other.pid == self.pid and abs(
            other.create_time - self.create_time) <= _CREATE_TIME_TOLERANCE_S

    def signal(self, sig: int = signal.SIGTERM) -> bool:
        """Send ``sig`` only if this process still exists; returns whether it was sent."""
        import psutil

        if not _valid_pid(self.pid):  # never 0, -1 or init: they address many processes
            return False
        proc = self._process()
        if proc is None:
            return False
        try:
            proc.send_signal(sig)  # psutil re-checks that the pid was not reused meanwhile
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied as exc:
            raise JobError(f"not allowed to signal process {self.pid}: {exc}") from None
        return True


def _valid_pid(pid: Any) -> bool:
    return isinstance(pid, int) and not isinstance(pid, bool) and pid > 1


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_bad_number(v: Any) -> bool:
    """NaN and inf: written as null, since JSON has no such numbers (a metric can be NaN)."""
    return isinstance(v, float) and not math.isfinite(v)


# ----------------------------------------------------------------------------------------------
# Status files: validated on read, so a malformed field is named instead of crashing a reader

_NUMBER_FIELDS = ("created", "updated", "queued", "launched", "started", "finished",
                  "duration_s", "eta_s", "images_per_s", "best_metric", "last_metric",
                  "fraction", "seconds")
_INT_FIELDS = ("epochs", "epochs_done", "epoch", "step", "steps", "best_epoch", "task", "tasks",
               "cells", "world", "params", "train_images", "test_images", "cpu_threads",
               "skipped_train", "skipped_test")
_TEXT_FIELDS = ("reason", "metric_name", "device", "command", "current", "kind", "warning",
                "executor", "ray_task")


def check_status(data: Any, where: str) -> tuple[dict, list[str]]:
    """The fields of a status file that have the right type, and a message per bad field.

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
    if key == "process":
        try:
            ProcessIdentity.parse(value)
        except ValueError as exc:
            return str(exc)
        return None
    if key in _NUMBER_FIELDS and not (_is_number(value) or value is None):
        return "must be a number"
    if key in _INT_FIELDS and not (isinstance(value, int) and not isinstance(value, bool)):
        return "must be an int"
    if key in _TEXT_FIELDS and not isinstance(value, str):
        return "must be text"
    return None


# ----------------------------------------------------------------------------------------------
# The job folder


class Job:
    """A job folder. Reading never changes it; writers go through :meth:`update` (locked)."""

    def __init__(self, folder: str | Path, after_death: str = "") -> None:
        """``after_death``: what a person can do when the process died (said with it)."""
        self.folder = Path(folder)
        self.after_death = after_death
        self.status_path = self.folder / "status.json"
        self.log_path = self.folder / "process.log"
        self.stop_path = self.folder / "STOP"
        self.lock_path = self.folder / ".lock"
        self.spec_path = self.folder / "spawn.json"

    # -- status -----------------------------------------------------------------------------

    def _read_json(self) -> Any:
        return read_json(self.status_path, "a job status")

    def raw_status(self) -> dict:
        """The status file as written, without its malformed fields, which the reason names.

        Only a malformed ``state`` or process identity makes the job ``failed`` (a process that
        cannot be verified is never the job's): a bad progress field (written by another
        version, say) must not hide a live job from Stop, nor let a second process start on
        its folder."""
        try:
            data = self._read_json()
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            return {"state": "failed", "reason": f"{self.status_path} is unreadable ({exc})"}
        good, problems = check_status(data, str(self.status_path))
        if problems:
            note = "; ".join(problems)
            unverifiable = (isinstance(data, dict) and data.get("process") is not None
                            and "process" not in good)
            if good.get("state") is None or unverifiable:
                good["state"] = "failed"
            good["reason"] = f"{good['reason']}; {note}" if good.get("reason") else note
        return good

    def update(self, **fields: Any) -> dict:
        """Merge ``fields`` into status.json (atomic write, serialised with other writers)."""
        with locked(self.lock_path):
            return self._merge(fields)

    def _merge(self, fields: dict) -> dict:
        try:
            current = self._read_json()
        except (OSError, ValueError):
            current = {}
        if not isinstance(current, dict):
            current = {}
        current.pop("pid", None)  # a legacy bare pid is never trusted again
        fields = {k: None if _is_bad_number(v) else v for k, v in fields.items()}
        status = {**current, **fields, "updated": time.time()}
        write_json_atomic(self.status_path, status)
        return status

    def process(self, status: dict | None = None) -> ProcessIdentity | None:
        """The recorded process (None if none is recorded or the field is malformed), from
        ``status`` when the caller has just read it."""
        status = self.raw_status() if status is None else status
        return ProcessIdentity.parse(status.get("process"))  # raw_status dropped a bad one

    def status(self) -> dict:
        """The status as a person should read it: an active job whose process has gone is
        ``stopped`` (a stop was requested) or ``failed``, at once."""
        status = self.raw_status()
        if status.get("state") not in ACTIVE:
            return status
        process = self.process(status)
        if process is not None and process.remote:
            quiet = time.time() - float(status.get("updated") or 0.0)
            if quiet < REMOTE_STALE_S:
                return status
        elif process is not None and process.alive():
            return status
        note = status.get("reason") if status.get("reason") not in ("", "starting") else None
        if process is None:
            waited = time.time() - float(status.get("launched") or status.get("updated") or 0.0)
            if waited < START_GRACE_S:
                return status
            return _ended(status, "failed", "never started: no process was recorded for it",
                          note)
        during = " during start-up" if status.get("state") == "starting" else ""
        if self.stop_requested():
            return _ended(status, "stopped",
                          f"stopped{during} (the process ended after a stop request)", note)
        if process.remote:
            return _ended(status, "failed", f"no word from its process on {process.host} for "
                          f"{REMOTE_STALE_S / 60:.0f} min{during} (lost?)", note)
        last = self.last_output_line()
        return _ended(status, "failed", f"process ended unexpectedly{during}"
                      + (f": {last}" if last else " (killed?)")
                      + (f"; {self.after_death}" if self.after_death else ""), note)

    def last_output_line(self) -> str:
        """The last non-empty line the process printed (a crash's error message)."""
        try:
            lines = read_tail(self.log_path, "a process log", 4096).splitlines()
        except OSError:
            return ""
        return next((ln.strip() for ln in reversed(lines) if ln.strip()), "")

    # -- stopping ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        self.stop_path.touch()

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    def clear_stop(self) -> None:
        self.stop_path.unlink(missing_ok=True)

    def stop(self) -> bool:
        """Ask the job to stop (STOP file + SIGTERM to its verified process); a queued job
        stops at once, without ever starting. Returns whether it was active or queued. A
        stale or foreign pid is never signalled."""
        status = self.status()
        if status.get("state") == "queued":
            with locked(self.lock_path):
                if self.raw_status().get("state") == "queued":  # not started meanwhile
                    self._merge({"state": "stopped", "finished": time.time(),
                                 "reason": "stopped while queued (it never started)"})
                    Slots(store_root_of(self.folder)).dequeue(self.folder)
                    return True
            status = self.status()
        if status.get("state") not in ACTIVE:
            return False
        self.request_stop()
        process = self.process(status)
        if process is not None:
            process.signal(signal.SIGTERM)
        return True

    # -- starting ---------------------------------------------------------------------------

    def spawn(self, args: list[str], env: dict[str, str] | None = None, compute: bool = True,
              **fields: Any) -> ProcessIdentity | None:
        """Start ``python -m engine <args>`` as this job, in its own session, and record its
        identity at once; ``fields`` go into the status (e.g. ``kind``, ``cells``).

        ``compute``: the process computes, so it takes one of the store's slots
        (:mod:`engine.slots`), or, when ``$LOSSATTN_MAX_JOBS`` are taken, the job waits as
        ``queued`` and None is returned; :func:`dispatch` starts it when a slot frees. A job
        that only watches others (a sweep whose cells run as jobs of their own) takes none."""
        self.folder.mkdir(parents=True, exist_ok=True)
        slots = Slots(store_root_of(self.folder)) if compute else None
        limit = job_limit() if compute else 0  # a bad $LOSSATTN_MAX_JOBS: said before anything
        with slots.locked() if slots else contextlib.nullcontext():
            with locked(self.lock_path):
                status = self.status()
                self._refuse_if_taken(status, slots)
                self.clear_stop()  # a stale request must not stop the new process
                # Behind the jobs already waiting here, even when a slot is free: first come,
                # first served.
                queue = slots is not None and (slots.held() >= limit
                                               or bool(slots.queued(this_host())))
                write_json_atomic(self.spec_path, {"args": list(args), "env": dict(env or {}),
                                                   "environment": job_environment()},
                                  durable=False)
                self._merge({"state": "queued" if queue else "starting",
                             "reason": "waiting for a free slot" if queue else "starting",
                             "process": None, ("queued" if queue else "launched"): time.time(),
                             **fields})
                if queue:
                    slots.enqueue(self.folder)
            if queue:
                return None
            return self._start(args, env, slots)

    def _refuse_if_taken(self, status: dict, slots: Slots | None) -> None:
        state = status.get("state")
        if state in ACTIVE:
            process = self.process(status)
            raise JobError(f"{self.folder.name} is already running"
                           + (f" (pid {process.pid})" if process else ""))
        if state == "queued":
            place = slots.place(self.folder) if slots else None
            if slots is not None and place is None:  # its entry was lost: it waits again
                slots.enqueue(self.folder)
                place = slots.place(self.folder)
            raise JobError(f"{self.folder.name} is already queued"
                           + (f" (place {place[0]} of {place[1]})" if place else "")
                           + "; it starts when a slot frees")

    def _start(self, args: list[str], env: dict[str, str] | None, slots: Slots | None,
               environment: dict[str, str] | None = None) -> ProcessIdentity:
        """The process itself (the job already says ``starting``); with ``slots`` (held
        locked by the caller) it gets a slot, which it takes up with its thread budget
        (:func:`engine.budget.holding`) before it computes. ``environment``: the job's, as
        recorded when it was queued (:func:`engine.slots.job_environment`)."""
        cmd = [sys.executable, "-m", "engine", *args]
        base = os.environ if environment is None else environment_for(environment)
        try:
            with open(self.log_path, "ab") as out:
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=PROJECT_ROOT, start_new_session=True,
                    env={**base, **(env or {}), JOB_ENV: str(self.folder.resolve())})
        except OSError as exc:  # no process exists: say so now, not after the start grace
            self.update(state="failed", reason=f"could not start the process: {exc}")
            raise
        if slots is not None:
            slots.write_lease(proc.pid, self.folder)
        identity = ProcessIdentity.of(proc.pid) or ProcessIdentity(proc.pid, time.time(),
                                                                        this_host())
        with locked(self.lock_path):
            if self.raw_status().get("process") is None:  # the child may have recorded itself
                self._merge({"process": identity.to_dict()})
        return identity

    @contextlib.contextmanager
    def attach(self, finish: bool = False, sigterm: bool = True,
               **fields: Any) -> Iterator[Job]:
        """Run the body as this job's process: SIGTERM raises :class:`JobStopped` (installed
        before the job is marked running; ``sigterm=False`` keeps the default, e.g. for a
        torchrun rank whose siblings must go down with it), the job is marked ``running`` with
        this process's identity, and a pending STOP request stops it at once. A STOP file is a
        request only for a process spawned for this job: anyone else finds a stale one and
        clears it. On the way out, a job that is still active is marked ``stopped``
        (JobStopped, KeyboardInterrupt), ``failed`` (any other exception), ``finished``
        (``finish``) or left for :meth:`complete`. Nested attaches of one job are fine."""
        me = ProcessIdentity.current()
        with _raise_on_sigterm() if sigterm else contextlib.nullcontext():
            # The marking is inside the try: a SIGTERM right after it (a sweep stopped as its
            # next cell starts) must still end the job as stopped, never leave it running.
            # Before the marking, or with another process recorded, the ending is a no-op.
            try:
                with locked(self.lock_path):
                    status = self.status()  # active with a process: that process is alive
                    other = self.process(status)
                    if (status.get("state") in ACTIVE and other is not None
                            and not me.matches(other)):
                        raise JobError(f"{self.folder.name} is already running "
                                       f"(pid {other.pid})")
                    if not self._spawned_here(me, other):
                        self.clear_stop()
                    self._merge({"state": "running", "reason": "", "process": me.to_dict(),
                                 "started": time.time(), **fields})
                if self.stop_requested():
                    raise JobStopped("stop requested before the job started")
                yield self
            except (JobStopped, KeyboardInterrupt) as exc:
                self._end_if_active(me, "stopped", str(exc) or "stopped on request")
                raise
            except BaseException as exc:
                self._end_if_active(me, "failed", f"{exc.__class__.__name__}: {exc}")
                raise
            if finish:
                self._end_if_active(me, "finished", "")

    def _spawned_here(self, me: ProcessIdentity, recorded: ProcessIdentity | None) -> bool:
        """Whether this process was started for this job (or already attached to it)."""
        job = spawned_job()
        if job is not None and job.folder.resolve() == self.folder.resolve():
            return True
        return me.matches(recorded)

    def complete(self, code: int = 0, reason: str = "") -> None:
        """Mark the job finished (``code`` 0) or failed, unless the job already ended itself."""
        me = ProcessIdentity.current()
        if code == 0:
            self._end_if_active(me, "finished", reason)
        else:
            self._end_if_active(me, "failed", reason or f"exit code {code}")

    def _end_if_active(self, me: ProcessIdentity, state: str, reason: str) -> None:
        with locked(self.lock_path):
            status = self.raw_status()
            recorded = self.process(status)
            if status.get("state") in ACTIVE and (recorded is None or me.matches(recorded)):
                if state == "stopped":  # first: whoever sees "stopped" sees it handled
                    self.clear_stop()
                self._merge({"state": state, "reason": reason, "finished": time.time()})


def _ended(status: dict, state: str, reason: str, note: str | None) -> dict:
    """The status of a job whose process has gone, keeping what the file had to say."""
    return {**status, "state": state, "reason": reason + (f"; {note}" if note else "")}


@contextlib.contextmanager
def _raise_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`JobStopped` in the main thread while the body runs, once: a
    second SIGTERM (a double click on Stop) must not break off the clean-up of the first."""
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(True)
            raise JobStopped("stopped by SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a test harness): no handler, nothing to restore
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def spawned_job() -> Job | None:
    """The job this process was spawned for (``$LOSSATTN_JOB_DIR``), if any."""
    folder = os.environ.get(JOB_ENV)
    return Job(folder) if folder else None


def wait(job: Job, timeout: float = 600.0, poll: float = 0.2) -> dict:
    """Block until the job is no longer active nor queued (for scripts and tests); returns its
    status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job.status()
        if status.get("state") not in (*ACTIVE, "queued"):
            return status
        if status.get("state") == "queued":  # a look: a killed job cannot start it
            dispatch(store_root_of(job.folder))
        time.sleep(poll)
    raise TimeoutError(f"{job.folder.name} still running after {timeout:.0f} s")


def dispatch(root: str | Path) -> list[Path]:
    """Start the queued jobs of the run store at ``root`` that this host queued, oldest first,
    while fewer than ``$LOSSATTN_MAX_JOBS`` slots are held here; returns their folders. A job
    that frees its slot calls this, and so does every look at the store (the Runs, Train and
    Sweep pages, ``runs list``), which starts what a killed job could not. Cheap when nothing
    is queued."""
    slots = Slots(root)
    if not slots.queue_folder.is_dir() or not any(slots.queue_folder.iterdir()):
        return []
    started = []
    with slots.locked():
        free = job_limit() - slots.held()
        for folder in slots.queued(this_host()):
            if free <= 0:
                break
            if _start_queued(Job(folder), slots):
                started.append(folder)
                free -= 1
    return started


def _start_queued(job: Job, slots: Slots) -> bool:
    """Start one queued job with what it was queued with; whether it started. Its queue entry
    goes only once it says ``starting`` (an interrupted start leaves it queued)."""
    if not job.folder.is_dir():  # deleted while it waited (never re-created by a lock file)
        return False
    try:
        spec = read_json(job.spec_path, "a queued job's start spec")
        args, env = list(spec["args"]), dict(spec.get("env") or {})
        environment = spec.get("environment")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        job.update(state="failed", reason=f"queued, but its start spec {job.spec_path} is "
                                          f"unreadable ({exc})")
        slots.dequeue(job.folder)
        return False
    with locked(job.lock_path):
        if job.raw_status().get("state") != "queued":  # stopped meanwhile
            return False
        job._merge({"state": "starting", "reason": "starting", "launched": time.time()})
    slots.dequeue(job.folder)
    try:
        job._start(args, env, slots, environment if isinstance(environment, dict) else None)
    except OSError:
        return False  # _start marked it failed with the reason
    return True


def queue_place(folder: str | Path) -> tuple[int, int] | None:
    """(1-based place, queue length) of a queued job; None when it is not queued. A job whose
    folder says ``queued`` but whose queue entry was lost (a start interrupted at the wrong
    moment) is queued again, at the end: every look that asks where it is heals it."""
    slots = Slots(store_root_of(folder))
    place = slots.place(folder)
    if place is None and job_state(Path(folder)) == "queued":
        with slots.locked():
            if slots.place(folder) is None:
                slots.enqueue(folder)
        place = slots.place(folder)
    return place
