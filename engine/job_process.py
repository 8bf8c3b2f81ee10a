"""A job's process as (pid, creation time, host): an identity that survives pid reuse.

A pid alone is not a process. A pid is recycled once its process has ended, so a stale pid in
a status file may name an unrelated process. A job therefore records its process as (pid,
creation time, host). A process counts as the job's only while both match, and no signal is
ever sent otherwise (nor to pid <= 1). A process on another host is never signalled: its pid
means nothing here.

This module knows processes only (no files, no jobs), so that the status file's reader
(:mod:`engine.job_status`), the slots (:mod:`engine.slots`) and the jobs
(:mod:`engine.jobs`) can all use it.
"""

from __future__ import annotations

import math
import os
import signal
import socket
from dataclasses import dataclass
from typing import Any

from engine.errors import JobError

CREATE_TIME_TOLERANCE_S = 1.0


def this_host() -> str:
    return socket.gethostname()


def valid_pid(pid: Any) -> bool:
    return isinstance(pid, int) and not isinstance(pid, bool) and pid > 1


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


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

        if not valid_pid(pid):
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
        ok = (isinstance(value, dict) and valid_pid(value.get("pid"))
              and is_number(value.get("create_time"))
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
            other.create_time - self.create_time) <= CREATE_TIME_TOLERANCE_S

    def signal(self, sig: int = signal.SIGTERM) -> bool:
        """Send ``sig`` only if this process still exists; returns whether it was sent."""
        import psutil

        if not valid_pid(self.pid):  # never 0, -1 or init: they address many processes
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
