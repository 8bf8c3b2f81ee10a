"""Training runs in the background: start, launch, resume and wait, for the app and the CLI.

A run trains in its own process, started as the run folder's job (:mod:`engine.jobs`) with a
:class:`~engine.job_spec.TrainSpec`, so it survives the app's script reruns and a closed tab,
and the app and the CLI only read files.
"""

from __future__ import annotations

from engine.config import RunConfig
from engine.errors import ConfigError
from engine.job_spec import TrainSpec
from engine.job_status import Status
from engine.jobs import ProcessIdentity
from engine.jobs import wait as wait_job
from engine.runs import Run, RunStore
from engine.train import check_machine, check_startable, prepare_run_config


def start(store: RunStore, run: Run, *, resume: bool = False,
          env: dict[str, str] | None = None) -> ProcessIdentity | None:
    """Start the trainer of ``run`` in its own process; returns the process's identity, or
    None when the store's slots are taken and the run waits as ``queued`` (it starts when one
    frees: :func:`engine.jobs.dispatch`). ``env`` adds to its environment (e.g.
    ``CUDA_VISIBLE_DEVICES`` to pin it to one GPU)."""
    check_startable(run, resume)  # refuse here, where the caller can show the message
    if resume:  # a new run was checked before its folder was made (prepare_run_config)
        try:
            check_machine(run.config())
        except ConfigError as exc:  # "use cpu or auto" cannot help: a run keeps its device
            raise ConfigError(f"run {run.name} cannot resume here: {str(exc).split('; use')[0]}"
                              "; a run resumes on the device it was made for, so resume it on "
                              "a machine that has one") from None
    identity = run.job.spawn(TrainSpec(run_dir=str(run.path.resolve()), resume=resume), env=env)
    store.index(run)
    return identity


def launch(store: RunStore, config: RunConfig) -> Run:
    """Resolve ``config`` against its data and this machine (its device: checked before the
    run's folder is made), create the run, and train it in the background."""
    run = store.create(prepare_run_config(config))
    start(store, run)
    return run


def resume(store: RunStore, name: str) -> Run:
    run = store.get(name)
    start(store, run, resume=True)
    return run


def wait(run: Run, timeout: float = 600.0, poll: float = 0.2) -> Status:
    """Block until the run is no longer running (for scripts and tests); returns its status."""
    wait_job(run.job, timeout, poll)
    return run.status()
