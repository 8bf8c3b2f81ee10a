"""Background training processes: start, stop and watch runs without blocking the caller.

A run trains in its own process (``python -m engine train --run-dir ...``) in a new session, so
it survives the app's script reruns and a closed browser tab; the app and the CLI only read
files. The child's own stdout/stderr go to ``process.log`` in the run directory, so a crash
before the trainer's logging starts is still on record.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from engine.config import RunConfig
from engine.runs import Run, RunStore, write_json_atomic

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STARTING = "starting"


def _detached(cmd: list[str], log_path: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
    """Start ``cmd`` in its own session (it outlives the app and a closed tab), its output
    appended to ``log_path``."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=PROJECT_ROOT,
                                start_new_session=True, env={**os.environ, **(env or {})})


def spawn(store: RunStore, run: Run, *, resume: bool = False,
          env: dict[str, str] | None = None) -> int:
    """Start the trainer for ``run`` in the background; returns its pid. ``env`` adds to the
    environment (e.g. ``CUDA_VISIBLE_DEVICES`` to pin it to one GPU)."""
    from engine.train import check_startable

    check_startable(run, resume)  # refuse here, where the caller can show the message
    cmd = [sys.executable, "-m", "engine", "train", "--run-dir", str(run.path.resolve()),
           "--quiet"] + (["--resume"] if resume else [])
    # Marked before the child exists, so that the child's own status writes (even an
    # immediate failure) always come after this one and win.
    run.stop_path.unlink(missing_ok=True)  # a stale request must not stop the new process
    run.update_status(state="running", reason=STARTING, pid=None, launched=time.time())
    proc = _detached(cmd, run.path / "process.log", env)
    if run.raw_status().get("reason") == STARTING:
        run.update_status(pid=proc.pid)
    store.index(run)
    return proc.pid


def spawn_cli(args: list[str], folder: Path, **info) -> int:
    """Start ``python -m engine <args>`` in the background for work that is not a training run
    (a sweep, a benchmark). Its output goes to ``folder/process.log`` and its pid (plus
    ``info``) to ``folder/process.json``, for :func:`cli_process` to read."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = _detached([sys.executable, "-m", "engine", *args], folder / "process.log")
    write_json_atomic(folder / "process.json", {"pid": proc.pid, "started": time.time(), **info})
    return proc.pid


def cli_process(folder: Path) -> dict:
    """What :func:`spawn_cli` recorded, with ``alive``; {} if nothing was started there."""
    import json

    from engine.runs import pid_alive

    try:
        info = json.loads((folder / "process.json").read_text())
    except (OSError, ValueError):
        return {}
    return {**info, "alive": pid_alive(info.get("pid"))}


def launch(store: RunStore, config: RunConfig) -> Run:
    """Resolve ``config`` against its data, create the run, and train it in the background."""
    from engine.train import prepare_run_config

    run = store.create(prepare_run_config(config))
    spawn(store, run)
    return run


def resume(store: RunStore, name: str) -> Run:
    run = store.get(name)
    spawn(store, run, resume=True)
    return run


def wait(run: Run, timeout: float = 600.0, poll: float = 0.2) -> dict:
    """Block until the run leaves the running state (for scripts and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run.status()
        if status.get("state") != "running":
            return status
        time.sleep(poll)
    raise TimeoutError(f"run {run.name} still running after {timeout:.0f} s")
