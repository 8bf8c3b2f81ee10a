"""Sweeps on a Ray cluster: every cell a Ray task (``python -m engine sweep --executor ray``).

Storage model: **one run store on a filesystem every node mounts, at the same path** (NFS, a
cluster filesystem; on one machine, its own disk). A cell's task trains the cell's run where it
lies, exactly as the local executor does, so the Runs and Sweep pages (which read the store)
show a cluster sweep like a local one, live. Nothing is shipped back; the project's code and
``LOSSATTN_DATA`` must also be at the same paths on every node (the task's ``PYTHONPATH`` is
the driver's project folder).

Faults: a task whose worker dies (killed, node lost) is retried by Ray (``max_retries``); the
retry resumes the run from its last checkpoint, and since a resumed run sees the batches the
uninterrupted one would have, it ends with the same weights. A cell that ends ``failed`` for a
reason of its own (a bad config, a non-finite loss) returns that state and is not retried
(``retry_exceptions`` stays off).

Stopping: the sweep's STOP file or SIGTERM reaches the driver, which asks every running cell to
stop (their STOP files: a cell checkpoints and ends ``stopped``), cancels the cells not yet
started, and force-cancels what has not ended after ``STOP_GRACE_S``. While the driver waits
on Ray, SIGTERM only sets a flag that its loop polls: Ray's ``wait`` runs the Python signal
handler from inside its C++ loop and turns an exception raised there into a ``SystemError``
(the sweep then ended ``failed`` instead of ``stopped``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import ConfigError
from engine.job_status import ACTIVE, State
from engine.jobs import JobStopped
from engine.runs import Run, RunStore
from engine.slots import THREADS_ENV

RAY_MISSING = ("the Ray executor needs Ray, an optional extra: pip install -r "
               "requirements-cluster.txt")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PASSED_ENV = ("LOSSATTN_DATA", "LOSSATTN_DATA_ROOTS", "LOSSATTN_CONFINED_TO", "HF_HUB_OFFLINE",
              "LOSSATTN_BF16_CPU")
"""Environment variables a cell needs as the driver has them (data location, offline hub, and
the app's confinement of data reads: a worker of an existing cluster gets its environment from
its raylet, not from the app that started the sweep)."""
STOP_GRACE_S = 60.0
CANCEL_SETTLE_S = 10.0


@dataclass(frozen=True)
class CellResources:
    """What each cell's task declares to Ray's scheduler."""

    cpus: float = 1.0
    gpus: float = 0.0
    max_retries: int = 3
    """Retries after a worker's death (not after the cell's own failure)."""

    def __post_init__(self) -> None:
        if not (self.cpus > 0 and self.gpus >= 0 and self.max_retries >= 0):
            raise ConfigError(f"Ray cell resources must be cpus > 0, gpus >= 0, retries >= 0; "
                              f"got cpus={self.cpus}, gpus={self.gpus}, "
                              f"retries={self.max_retries}")


@dataclass(frozen=True)
class RayExecutor:
    """Run the cells as tasks on a Ray cluster (:mod:`engine.cluster`)."""

    address: str | None = None
    """``host:port`` of a running cluster, ``auto``, or None: start a local Ray."""
    resources: CellResources = field(default_factory=CellResources)
    stop_requested: Callable[[], bool] = lambda: False
    """Polled by the driver (the sweep job's STOP file)."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


def connect(address: str | None, local_cpus: int | None = None) -> str:
    """Join the cluster at ``address`` (``host:port``, or ``auto`` for the one this machine
    runs), or start a local Ray when None (with ``local_cpus``, default all cores); returns
    the cluster's address. Already connected: kept."""
    ray = import_ray()
    if not ray.is_initialized():
        on_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address, num_cpus=local_cpus if address is None else None,
                     include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env=_runtime_env())
        except SystemExit as exc:
            # ray.init makes SIGTERM exit the driver, at once; one that came while it joined
            # goes to the handler the process had (a sweep's: stop, not fail)
            if exc.code != signal.SIGTERM or not callable(on_sigterm):
                raise
            on_sigterm(signal.SIGTERM, None)
            raise
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, on_sigterm)
    return ray.get_runtime_context().gcs_address


def _runtime_env() -> dict:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {**env, "PYTHONPATH": path}}


def train_cell(root: str, name: str) -> dict:
    """A Ray task: train (or resume) one cell's run in the shared store; returns its end."""
    import ray
    import torch

    from engine.train import train_run

    task = ray.get_runtime_context().get_task_id()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:  # the CPUs the task declared, not every core's share of the node it landed on
        torch.set_num_threads(max(1, int(cpus)))
        os.environ[THREADS_ENV] = str(max(1, int(cpus)))  # the trainer's budget, pinned
    store = RunStore(root)
    run = store.get(name)
    raw = run.raw_status()
    if raw.state in ACTIVE and raw.fields.get("ray_task") == task:
        # An earlier attempt of this very task: Ray retries only once its worker is gone (on
        # another node its status would still look fresh for a while).
        run.update_status(state=State.FAILED,
                          reason="its Ray worker died; Ray retried the cell")
    resume = run.status().state != State.CREATED
    run.update_status(ray_task=task)
    state = train_run(run, resume=resume, progress_bar=False, console=False,
                      on_status=store.index)
    return {"name": name, "state": state, "reason": run.status().reason}


def run_sweep_ray(store: RunStore, todo: list[tuple[Run, bool]], resources: CellResources,
                  address: str | None = None, stop_requested: Callable[[], bool] = lambda: False,
                  log=print) -> None:
    """Train the cells as Ray tasks, all submitted at once (Ray queues what does not fit).
    ``stop_requested`` is polled (the sweep's STOP file); SIGTERM arrives as JobStopped."""
    ray = import_ray()
    log(f"Ray cluster at {connect(address)}: {len(todo)} cell(s), {resources.cpus:g} CPU "
        f"and {resources.gpus:g} GPU each")
    task = ray.remote(train_cell).options(
        num_cpus=resources.cpus, num_gpus=resources.gpus, max_retries=resources.max_retries,
        retry_exceptions=False)
    root = str(store.root.resolve())
    with _sigterm_as_flag() as sigterm:
        pending = {task.remote(root, run.name): run for run, _ in todo}
        try:
            while pending:
                if sigterm.is_set() or stop_requested():
                    raise JobStopped("sweep stopped; run it again to resume its cells")
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in done:
                    run = pending.pop(ref)
                    log(_ended_line(ray, ref, run))
        except BaseException:
            _stop_cells(ray, pending, log)
            raise


@contextlib.contextmanager
def _sigterm_as_flag() -> Iterator[threading.Event]:
    """SIGTERM sets the yielded event instead of raising (see the module docstring), also during
    the stop's clean-up; the previous handler is back afterwards. Off the main thread Python
    allows no handler: nothing changes."""
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ended_line(ray, ref, run: Run) -> str:
    try:
        end = ray.get(ref)
    except ray.exceptions.RayError as exc:  # retries used up, or the task could not run
        run.update_status(state=State.FAILED, reason=f"on Ray: {exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}")
        return f"{run.name}: failed on Ray ({exc.__class__.__name__})"
    return f"{run.name}: {end['state']}" + (f" ({end['reason']})" if end["reason"] else "")


def _stop_cells(ray, pending: dict, log) -> None:
    """Cancel the queued cells, ask the running ones to stop (they checkpoint), and force what
    is still there after the grace period.

    Queued first: a running cell that stops frees its CPUs, and Ray would start a queued cell
    on them before it was cancelled. The queued cells get the STOP request too: one that had
    just started sees it at its next step, while one still starting clears it as stale and is
    stopped by its cancel instead (Ray raises KeyboardInterrupt in a running task). The driver
    waits for the cancels to settle before it returns."""
    started = {ref: run for ref, run in pending.items() if run.raw_status().state in ACTIVE}
    queued = [ref for ref in pending if ref not in started]
    for ref in queued:
        ray.cancel(ref)
    for run in pending.values():
        run.request_stop()
    deadline = time.monotonic() + STOP_GRACE_S
    while started and time.monotonic() < deadline:
        done, _ = ray.wait(list(started), num_returns=len(started), timeout=1.0)
        for ref in done:
            started.pop(ref)
    for ref in started:
        ray.cancel(ref, force=True)
    if queued:
        ray.wait(queued, num_returns=len(queued), timeout=CANCEL_SETTLE_S)
    for run in pending.values():
        if run.status().state not in ACTIVE:
            run.job.clear_stop()  # a cell that never started must not find a stale request
    log(f"stopped: {len(pending)} cell(s) stopped or cancelled")
