"""Compute slots of a run store: how many threads a job may use, and how many jobs may run.

Four default digits runs started together with torch's default threads (two each on a 2-core
machine) had not finished after 11 minutes: OpenMP threads that wait on each other at every
barrier collapse when more of them than cores compete. With one thread each, all four finished
in 38 s, faster than one after another (issue 34's measurement; ``tests/bench_jobs.py`` has
this project's). So every process that computes under a run store holds a *slot* while it
computes: a lease file ``<store>/_slots/<pid>-<create time>.json`` naming its process and its
job. Two things follow from the leases of this host:

- **The thread budget**: a job's torch threads are the cores divided among the slots held
  (at least 1). A training run looks again about once a second and follows the budget as jobs
  start and end, so the threads in use never exceed the cores for long. ``train.threads``
  (``--threads``), ``$LOSSATTN_THREADS`` or ``$OMP_NUM_THREADS`` pin the count instead;
  floating-point sums depend on it, so a run meant to be repeated bit for bit pins it.
- **The queue**: a background job started while ``$LOSSATTN_MAX_JOBS`` slots are held waits as
  ``queued`` (:meth:`engine.jobs.Job.spawn`) and starts, oldest first, when a slot frees
  (:func:`engine.jobs.dispatch`). Its place is a pointer file in ``_slots/queue/``; the job
  folder itself says ``queued``, so the queue survives a restart of the app.

A process killed without clean-up leaves its lease behind; a lease whose process is gone is
ignored and removed at the next look. Leases of processes on other hosts (a run store that
several machines mount) are never judged by pid and never count here: cores are per machine.

This module knows files and processes only (no torch, no jobs: the status file's reader
:mod:`engine.job_status` and :mod:`engine.job_process`), so that :mod:`engine.jobs` can use
it; a process holds its slot through :func:`engine.budget.holding`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ConfigError
from engine.fsutil import locked, write_json_atomic
from engine.job_process import this_host
from engine.job_status import State, read_state
from engine.safe_io import read_json

LIMIT_ENV = "LOSSATTN_MAX_JOBS"
"""How many jobs may compute at once under one store on this host (the queue's limit)."""
THREADS_ENV = "LOSSATTN_THREADS"
"""A fixed torch thread count for every job (tests, scripts), instead of the budget."""
SLOTS_FOLDER = "_slots"
CREATE_TIME_TOLERANCE_S = 1.0


def cores() -> int:
    """The CPUs this process may run on (its affinity, which containers and ``taskset``
    narrow), not every core of the host."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_limit() -> int:
    """As many jobs at once as cores, each on one thread: measured fastest on the 2-core
    machine (``tests/bench_perf.py --only jobs``; docs/performance.md)."""
    return cores()


def _positive_int_env(name: str, what: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"${name} ({what}) must be a positive int; got {text!r}")
    return value


def job_limit() -> int:
    """The queue's limit: ``$LOSSATTN_MAX_JOBS``, else :func:`default_limit`. 0, a negative
    value or a non-number is an error naming the variable."""
    return _positive_int_env(LIMIT_ENV, "jobs computing at once") or default_limit()


def fixed_threads() -> int | None:
    """A thread count pinned for every job by the environment (None: the budget):
    ``$LOSSATTN_THREADS``, else ``$OMP_NUM_THREADS`` as OpenMP itself reads it (a user who
    set it asked for that count; nothing here sets it)."""
    pinned = _positive_int_env(THREADS_ENV, "torch threads of every job")
    if pinned is not None:
        return pinned
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(omp) if omp.isdigit() and int(omp) >= 1 else None


def budget_for(slots_held: int) -> int:
    """Each job's share of the cores when ``slots_held`` jobs compute (at least 1 thread)."""
    return max(1, cores() // max(1, slots_held))


JOB_SUBFOLDERS = ("_sweeps", "_mil", "_bench")
"""Where the store keeps the folders of jobs that are not runs (engine.runs' layout)."""


def store_root_of(job_folder: str | Path) -> Path:
    """The run store a job folder belongs to: a run's folder lies in the store's root, the
    other jobs' (``_sweeps/NAME``, ``_mil/NAME``, ``_bench/NAME``) one level deeper."""
    folder = Path(job_folder).resolve()
    parent = folder.parent
    return parent.parent if parent.name in JOB_SUBFOLDERS else parent


ENV_PREFIXES = ("LOSSATTN_", "HF_", "CUDA_", "OMP_", "MKL_", "PYTHONPATH", "RAY_")
"""The environment a job depends on (its data roots, thread pins, devices): recorded when it
is queued and given to it when it starts, whoever starts it (the app, ``runs list``, another
job that ended)."""


def job_environment(environ: dict | None = None) -> dict[str, str]:
    """The variables of ``environ`` (this process's by default) that :data:`ENV_PREFIXES`
    name, but the job folder's own."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items()
            if k.startswith(ENV_PREFIXES) and k != "LOSSATTN_JOB_DIR"}


def environment_for(recorded: dict[str, str]) -> dict[str, str]:
    """This process's environment with the recorded job environment in place of its own
    (a variable the job's starter did not have is not passed on either)."""
    mine = {k: v for k, v in os.environ.items() if k not in job_environment()}
    return {**mine, **recorded}


@dataclass(frozen=True)
class Lease:
    """One process's slot: its identity (pid, creation time, host) and its job folder."""

    pid: int
    create_time: float
    host: str
    job: str | None
    path: Path

    def alive(self) -> bool:
        """Whether the process still exists (a pid that was reused does not count). A lease of
        another host is taken as alive: its pid means nothing here."""
        if self.host != this_host():
            return True
        return _process_matches(self.pid, self.create_time)


def _process_matches(pid: int, create_time: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return (abs(proc.create_time() - create_time) <= CREATE_TIME_TOLERANCE_S
                and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _creation_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class Slots:
    """The slots and the queue of the run store at ``root`` (files under ``root/_slots``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.folder = self.root / SLOTS_FOLDER
        self.queue_folder = self.folder / "queue"
        self.lock_path = self.folder / ".lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialises counting the slots with taking one (two launches at once must not both
        see a free slot)."""
        with locked(self.lock_path):
            yield

    # -- leases -----------------------------------------------------------------------------

    def _lease_path(self, pid: int, create_time: float) -> Path:
        return self.folder / f"{pid}-{int(create_time * 1000)}.json"

    def leases(self) -> list[Lease]:
        """The live leases of this host (and any of other hosts). Leases whose process has
        gone are removed."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.glob("*.json"):
            lease = _read_lease(path)
            if lease is None:
                continue
            if lease.alive():
                found.append(lease)
            else:
                path.unlink(missing_ok=True)
        return found

    def held(self) -> int:
        """Slots held on this host now."""
        return sum(1 for lease in self.leases() if lease.host == this_host())

    def lease_of(self, pid: int) -> Lease | None:
        """Process ``pid``'s live lease on this host. By pid and creation time within the
        tolerance, not by the exact file name: a creation time read again after a clock step
        differs slightly."""
        for path in self.folder.glob(f"{pid}-*.json"):
            lease = _read_lease(path)
            if lease is not None and lease.host == this_host() and lease.alive():
                return lease
        return None

    def write_lease(self, pid: int, job: str | Path | None) -> Lease | None:
        """Record that process ``pid`` (already started) holds a slot for ``job``."""
        create_time = _creation_time(pid)
        if create_time is None:  # it ended already
            return None
        path = self._lease_path(pid, create_time)
        write_json_atomic(path, {"pid": pid, "create_time": create_time, "host": this_host(),
                                 "job": None if job is None else str(Path(job).resolve()),
                                 "since": time.time()}, durable=False)
        return _read_lease(path)

    # -- the queue --------------------------------------------------------------------------

    def enqueue(self, job: str | Path) -> None:
        """Put ``job`` at the end of the queue (its folder already says ``queued``), for this
        host to start: a job queued here starts here, never on a node that shares the store."""
        self.dequeue(job)
        name = f"{time.time_ns():020d}-{os.getpid()}.json"
        write_json_atomic(self.queue_folder / name, {"job": str(Path(job).resolve()),
                                                     "host": this_host()}, durable=False)

    def dequeue(self, job: str | Path) -> None:
        """Take ``job`` out of the queue (stopped, deleted, or starting)."""
        target = Path(job).resolve()
        for pointer, folder, _ in self.queue_entries():
            if folder == target:
                pointer.unlink(missing_ok=True)

    def queue_entries(self) -> list[tuple[Path, Path, str]]:
        """(pointer file, job folder, host) in queue order, oldest first."""
        if not self.queue_folder.is_dir():
            return []
        entries = []
        for pointer in sorted(self.queue_folder.glob("*.json")):
            try:
                data = read_json(pointer, "a queue entry")
                entries.append((pointer, Path(data["job"]), str(data.get("host") or "")))
            except (OSError, ValueError, KeyError, TypeError):
                pointer.unlink(missing_ok=True)  # a torn or foreign file: not a queue entry
        return entries

    def queued(self, host: str | None = None) -> list[Path]:
        """The queued job folders, oldest first (``host``: only those that host starts);
        entries of jobs that no longer say ``queued``, stopped or deleted while they waited,
        are dropped."""
        order = []
        for pointer, job, where in self.queue_entries():
            if job_state(job) != State.QUEUED or job in order:
                pointer.unlink(missing_ok=True)
            elif host is None or where == host:
                order.append(job)
        return order

    def place(self, job: str | Path) -> tuple[int, int] | None:
        """(1-based place, queue length) of a queued job; None when it is not queued."""
        order = self.queued()
        target = Path(job).resolve()
        return (order.index(target) + 1, len(order)) if target in order else None


def job_state(folder: Path) -> State | None:
    """The ``state`` field of a job folder's status.json, as written (None if unreadable)."""
    return read_state(Path(folder) / "status.json")


def _read_lease(path: Path) -> Lease | None:
    try:
        data = read_json(path, "a slot lease")
        return Lease(int(data["pid"]), float(data["create_time"]), str(data["host"]),
                     data.get("job"), path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
