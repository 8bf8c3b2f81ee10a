"""Background jobs: one folder per job, started, watched and stopped by this module alone.

Training runs, sweeps, MIL experiments and benchmarks all run in processes of their own, so
that they outlive the app's script reruns and a closed tab. Each has a job folder::

    spec.json     what the job runs: its kind and settings, typed (engine.job_spec)
    status.json   its Status: state, reason, the process's identity, and the job's own progress
                  fields (engine.job_status reads and writes it)
    spawn.json    how it was started: the environment it starts with (a queued job's too)
    process.log   the process's stdout and stderr (a crash before logging starts is on record)
    STOP          present while a stop is requested
    .lock         serialises read-modify-write of status.json between the job and its starter

plus whatever the job itself writes (a run's config and checkpoints, a sweep's report, ...).
Every kind of job runs as one command, ``python -m engine job FOLDER``, which reads spec.json
(:mod:`engine.job_run`).

States (:class:`~engine.job_status.State`): ``created`` -> (``queued``) -> ``starting`` ->
``running`` -> ``finished`` | ``stopped`` | ``failed``. A job that computes holds one of its
run store's slots (:mod:`engine.slots`): when ``$LOSSATTN_MAX_JOBS`` are held,
:meth:`Job.spawn` leaves it ``queued`` and :func:`dispatch` starts it, oldest first, when a slot
frees. A job queued by the previous version (its ``spawn.json`` holds the command line,
``{"args": [...]}``) starts with that command line.

Process identity (:class:`~engine.job_process.ProcessIdentity`): a pid alone is not a process.
A job records its process as (pid, creation time, host); a process counts as the job's only
while both match, and no signal is ever sent otherwise (nor to pid <= 1). The starter records
the identity the moment the child exists, so a job whose process is gone shows as ended at the
next look.

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
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.errors import JobError
from engine.fsutil import locked, write_json_atomic
from engine.job_process import ProcessIdentity, this_host
from engine.job_spec import SPEC_FILE, JobSpec, SpecError, read_spec
from engine.job_status import (
    ACTIVE,
    LIVE,
    STATES,
    State,
    Status,
    check_status,
    merge_status,
    read_status,
)
from engine.safe_io import read_json, read_tail
from engine.slots import (
    Slots,
    environment_for,
    job_environment,
    job_limit,
    job_state,
    store_root_of,
)

__all__ = ["ACTIVE", "LIVE", "STATES", "Job", "JobStopped", "ProcessIdentity", "State",
           "Status", "check_status", "dispatch", "queue_place", "spawned_job", "wait"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
JOB_ENV = "LOSSATTN_JOB_DIR"
"""Set in a spawned process's environment: the job folder it belongs to."""
JOB_COMMAND = "job"
"""``python -m engine job FOLDER``: the one command every spawned job runs."""
START_GRACE_S = 30.0
"""How long a job may say ``starting`` with no process recorded (its starter died mid-start)."""
REMOTE_STALE_S = 600.0
"""A process on another host whose job's status has not changed for this long counts as gone
(long enough for an evaluation pass over a large test set, which writes no status)."""


class JobStopped(BaseException):  # a control-flow signal, like KeyboardInterrupt
    """Raised in a job's main thread by SIGTERM (or a STOP file) outside cooperative loops."""


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
        self.spec_path = self.folder / SPEC_FILE
        self.start_path = self.folder / "spawn.json"

    # -- status -----------------------------------------------------------------------------

    def raw_status(self) -> Status:
        """The status file as written, without its malformed fields, which the reason names
        (:func:`engine.job_status.parse_status`); :attr:`Status.missing` without a file."""
        return read_status(self.status_path)

    def update(self, **fields: Any) -> Status:
        """Merge ``fields`` into status.json (atomic write, serialised with other writers);
        ``state`` a :class:`State`, the rest the job's own progress fields."""
        with locked(self.lock_path):
            return self._merge(fields)

    def _merge(self, fields: dict) -> Status:
        return merge_status(self.status_path, fields)

    def process(self, status: Status | None = None) -> ProcessIdentity | None:
        """The recorded process (None if none is recorded or the field is malformed), from
        ``status`` when the caller has just read it."""
        return (self.raw_status() if status is None else status).process

    def status(self) -> Status:
        """The status as a person should read it: an active job whose process has gone is
        ``stopped`` (a stop was requested) or ``failed``, at once."""
        status = self.raw_status()
        if status.state not in ACTIVE:
            return status
        process = status.process
        if process is not None and process.remote:
            quiet = time.time() - (status.updated or 0.0)
            if quiet < REMOTE_STALE_S:
                return status
        elif process is not None and process.alive():
            return status
        note = status.reason if status.reason not in ("", "starting") else None
        if process is None:
            waited = time.time() - (status.launched or status.updated or 0.0)
            if waited < START_GRACE_S:
                return status
            return _ended(status, State.FAILED, "never started: no process was recorded for it",
                          note)
        during = " during start-up" if status.state == State.STARTING else ""
        if self.stop_requested():
            return _ended(status, State.STOPPED,
                          f"stopped{during} (the process ended after a stop request)", note)
        if process.remote:
            return _ended(status, State.FAILED, f"no word from its process on {process.host} "
                          f"for {REMOTE_STALE_S / 60:.0f} min{during} (lost?)", note)
        last = self.last_output_line()
        return _ended(status, State.FAILED, f"process ended unexpectedly{during}"
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
        if status.state == State.QUEUED:
            with locked(self.lock_path):
                if self.raw_status().state == State.QUEUED:  # not started meanwhile
                    self._merge({"state": State.STOPPED, "finished": time.time(),
                                 "reason": "stopped while queued (it never started)"})
                    Slots(store_root_of(self.folder)).dequeue(self.folder)
                    return True
            status = self.status()
        if status.state not in ACTIVE:
            return False
        self.request_stop()
        process = status.process
        if process is not None:
            process.signal(signal.SIGTERM)
        return True

    # -- starting ---------------------------------------------------------------------------

    def spawn(self, spec: JobSpec, env: dict[str, str] | None = None, compute: bool = True,
              **fields: Any) -> ProcessIdentity | None:
        """Start ``spec`` as this job: write it to ``spec.json`` and start ``python -m engine
        job FOLDER`` in its own session, and record its identity at once; ``env`` adds to its
        environment; ``fields`` go into the status (e.g. ``kind``, ``cells``).

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
                write_json_atomic(self.spec_path, spec.to_dict(), durable=False)
                write_json_atomic(self.start_path, {"env": dict(env or {}),
                                                    "environment": job_environment()},
                                  durable=False)
                self._merge({"state": State.QUEUED if queue else State.STARTING,
                             "reason": "waiting for a free slot" if queue else "starting",
                             "process": None, ("queued" if queue else "launched"): time.time(),
                             **fields})
                if queue:
                    slots.enqueue(self.folder)
            if queue:
                return None
            return self._start(self.command(), env, slots)

    def command(self) -> list[str]:
        """The arguments of ``python -m engine`` that run this job (from its spec.json)."""
        return [JOB_COMMAND, str(self.folder.resolve())]

    def _refuse_if_taken(self, status: Status, slots: Slots | None) -> None:
        state = status.state
        if state in ACTIVE:
            process = status.process
            raise JobError(f"{self.folder.name} is already running"
                           + (f" (pid {process.pid})" if process else ""))
        if state == State.QUEUED:
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
            self.update(state=State.FAILED, reason=f"could not start the process: {exc}")
            raise
        if slots is not None:
            slots.write_lease(proc.pid, self.folder)
        identity = ProcessIdentity.of(proc.pid) or ProcessIdentity(proc.pid, time.time(),
                                                                        this_host())
        with locked(self.lock_path):
            if self.raw_status().process is None:  # the child may have recorded itself
                self._merge({"process": identity})
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
                    other = status.process
                    if (status.state in ACTIVE and other is not None
                            and not me.matches(other)):
                        raise JobError(f"{self.folder.name} is already running "
                                       f"(pid {other.pid})")
                    if not self._spawned_here(me, other):
                        self.clear_stop()
                    self._merge({"state": State.RUNNING, "reason": "", "process": me,
                                 "started": time.time(), **fields})
                if self.stop_requested():
                    raise JobStopped("stop requested before the job started")
                yield self
            except (JobStopped, KeyboardInterrupt) as exc:
                self._end_if_active(me, State.STOPPED, str(exc) or "stopped on request")
                raise
            except BaseException as exc:
                self._end_if_active(me, State.FAILED, f"{exc.__class__.__name__}: {exc}")
                raise
            if finish:
                self._end_if_active(me, State.FINISHED, "")

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
            self._end_if_active(me, State.FINISHED, reason)
        else:
            self._end_if_active(me, State.FAILED, reason or f"exit code {code}")

    def _end_if_active(self, me: ProcessIdentity, state: State, reason: str) -> None:
        with locked(self.lock_path):
            status = self.raw_status()
            recorded = status.process
            if status.state in ACTIVE and (recorded is None or me.matches(recorded)):
                if state == State.STOPPED:  # first: whoever sees "stopped" sees it handled
                    self.clear_stop()
                self._merge({"state": state, "reason": reason, "finished": time.time()})


def _ended(status: Status, state: State, reason: str, note: str | None) -> Status:
    """The status of a job whose process has gone, keeping what the file had to say."""
    return dataclasses.replace(status, state=state,
                               reason=reason + (f"; {note}" if note else ""))


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


def wait(job: Job, timeout: float = 600.0, poll: float = 0.2) -> Status:
    """Block until the job is no longer active nor queued (for scripts and tests); returns its
    status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job.status()
        if status.state not in LIVE:
            return status
        if status.state == State.QUEUED:  # a look: a killed job cannot start it
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
        args, env, environment = _queued_start(job)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        job.update(state=State.FAILED, reason=f"queued, but it cannot start: {exc}")
        slots.dequeue(job.folder)
        return False
    with locked(job.lock_path):
        if job.raw_status().state != State.QUEUED:  # stopped meanwhile
            return False
        job._merge({"state": State.STARTING, "reason": "starting", "launched": time.time()})
    slots.dequeue(job.folder)
    try:
        job._start(args, env, slots, environment)
    except OSError:
        return False  # _start marked it failed with the reason
    return True


def _queued_start(job: Job) -> tuple[list[str], dict[str, str], dict[str, str] | None]:
    """(arguments of ``python -m engine``, added environment, recorded job environment) of a
    queued job. Its spec is read now, so that a malformed one fails the job with the field
    named instead of starting a process that would. A job queued by the previous version has
    its command line in spawn.json (``{"args": [...]}``) and no spec.json: it runs that."""
    try:
        start = read_json(job.start_path, "a queued job's start record")
    except (OSError, ValueError) as exc:
        raise ValueError(f"its start record {job.start_path} is unreadable ({exc})") from None
    if not isinstance(start, dict):
        raise TypeError(f"its start record {job.start_path} must hold a JSON object")
    environment = start.get("environment")
    environment = environment if isinstance(environment, dict) else None
    env = dict(start.get("env") or {})
    if "args" in start:  # the previous version's form
        args = start["args"]
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
            raise TypeError(f"its start record {job.start_path}: field 'args' must be a list "
                            "of strings")
        return list(args), env, environment
    try:
        read_spec(job.folder)
    except SpecError as exc:
        raise ValueError(str(exc)) from None
    return job.command(), env, environment


def queue_place(folder: str | Path) -> tuple[int, int] | None:
    """(1-based place, queue length) of a queued job; None when it is not queued. A job whose
    folder says ``queued`` but whose queue entry was lost (a start interrupted at the wrong
    moment) is queued again, at the end: every look that asks where it is heals it."""
    slots = Slots(store_root_of(folder))
    place = slots.place(folder)
    if place is None and job_state(Path(folder)) == State.QUEUED:
        with slots.locked():
            if slots.place(folder) is None:
                slots.enqueue(folder)
        place = slots.place(folder)
    return place
