"""A MIL experiment: several data sets x methods, cross-validated, written to one results folder.

This is what ``python -m engine mil`` runs, in the foreground or (from the app) as a background
process under ``<run store>/_mil/<name>/``. The folder's ``progress.json`` tells a poller which
(data set, method) is running and how far the whole experiment is; ``results.*`` grow as each
pair finishes.
"""

from __future__ import annotations

import dataclasses
import re
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from engine.mil.data import BENCHMARKS, load_mil_dataset
from engine.mil.models import MIL_METHODS
from engine.mil.protocol import (
    MilConfig,
    cross_validate,
    default_threads,
    read_progress,
    write_progress,
    write_results,
)

MIL_FOLDER = "_mil"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}"


def parse_datasets(text: str) -> list[str]:
    """``"all"`` (the five benchmarks), or a comma list of names / folders / CSV files."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("--dataset is empty")
    out: list[str] = []
    for item in items:
        for name in (BENCHMARKS if item == "all" else (item,)):
            if name not in out:
                out.append(name)
    return out


def parse_methods(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [m for m in items if m not in MIL_METHODS]
    if not items or bad:
        raise ValueError(f"--method must be a comma list of {list(MIL_METHODS)}; got {text!r}")
    return list(dict.fromkeys(items))


def run_experiment(datasets: Sequence[str], methods: Sequence[str], config: MilConfig,
                   out: str | Path, data_root: str | None = None, threads: int = 0,
                   log: Callable[[str], None] = print) -> list[dict]:
    """Cross-validate every (data set, method) with ``config`` (its ``method`` is replaced);
    results are merged into ``out`` after each pair. Returns the new rows (without weights)."""
    out = Path(out)
    torch.set_num_threads(threads or default_threads())
    tasks = [(d, m) for d in datasets for m in methods]
    started = time.time()
    write_progress(out, state="running", started=started, tasks=len(tasks), task=0,
                   fraction=0.0, current=None, error=None, finished=None,
                   datasets=list(datasets), methods=list(methods), config=config.to_dict())
    rows = []
    try:
        cache: dict[str, object] = {}
        for i, (dataset, method) in enumerate(tasks):
            if dataset not in cache:
                cache = {dataset: load_mil_dataset(dataset, data_root, seed=config.seed)}
            data = cache[dataset]
            cfg = dataclasses.replace(config, method=method)

            def progress(fraction: float, i: int = i, label: str = f"{data.name}/{method}"
                         ) -> None:
                write_progress(out, task=i, current=label,
                               fraction=round((i + fraction) / len(tasks), 4))

            progress(0.0)
            row = cross_validate(data, cfg, progress)
            row["threads"] = torch.get_num_threads()
            write_results(out, [row])
            rows.append({k: v for k, v in row.items() if k != "bag_weights"})
            log(f"{data.name:10s} {method:16s} accuracy {row['accuracy_mean']:.3f} ± "
                f"{row['accuracy_std']:.3f}  ({row['folds_done']} folds, {row['seconds']:.0f} s)")
    except Exception as exc:
        write_progress(out, state="failed", error=f"{exc.__class__.__name__}: {exc}",
                       traceback=traceback.format_exc(limit=5), finished=time.time())
        raise
    except KeyboardInterrupt:
        write_progress(out, state="stopped", error="interrupted", finished=time.time())
        raise
    write_progress(out, state="finished", task=len(tasks), fraction=1.0, current=None,
                   finished=time.time(), seconds=round(time.time() - started, 1))
    return rows


# ----------------------------------------------------------------------------------------------
# Background experiments under the run store (what the app starts and watches)


def mil_root(runs_root: str | Path) -> Path:
    return Path(runs_root) / MIL_FOLDER


def list_experiments(runs_root: str | Path) -> list[str]:
    """Experiment folder names, newest first."""
    root = mil_root(runs_root)
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return [p.name for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]


def cli_args(datasets: Sequence[str], methods: Sequence[str], config: MilConfig, out: Path,
             data_root: str | None = None, threads: int = 0) -> list[str]:
    """``python -m engine`` arguments that run this experiment."""
    args = ["mil", "--dataset", ",".join(datasets), "--method", ",".join(methods),
            "--out", str(out), "--quiet"]
    defaults = MilConfig()
    for f in dataclasses.fields(MilConfig):
        value = getattr(config, f.name)
        if f.name == "method" or value == getattr(defaults, f.name):
            continue
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        args += [f"--{f.name.replace('_', '-')}", text]
    if data_root:
        args += ["--data-root", str(data_root)]
    if threads:
        args += ["--threads", str(threads)]
    return args


def start_experiment(runs_root: str | Path, name: str, datasets: Sequence[str],
                     methods: Sequence[str], config: MilConfig, data_root: str | None = None,
                     threads: int = 0) -> Path:
    """Start the experiment in a background process; returns its folder. Refuses a name that
    is taken by an experiment still running."""
    from engine import jobs

    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"experiment name must be 1-80 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit; got {name!r}")
    folder = mil_root(runs_root) / name
    if experiment_alive(folder):
        raise ValueError(f"experiment {name!r} is still running; stop it or pick another name")
    folder.mkdir(parents=True, exist_ok=True)
    write_progress(folder, state="running", fraction=0.0, task=0, tasks=len(datasets) *
                   len(methods), current="starting", error=None, started=time.time())
    jobs.spawn_cli(cli_args(datasets, methods, config, folder.resolve(), data_root, threads),
                   folder, kind="mil", datasets=list(datasets), methods=list(methods))
    return folder


def experiment_alive(folder: Path) -> bool:
    from engine import jobs

    return bool(jobs.cli_process(folder).get("alive"))


def experiment_status(folder: str | Path) -> dict:
    """progress.json, with a started-but-vanished process reported as failed."""
    folder = Path(folder)
    progress = read_progress(folder)
    if progress.get("state") == "running" and not experiment_alive(folder):
        from engine import jobs

        if jobs.cli_process(folder):  # it was started, and its process is gone
            log = folder / "process.log"
            tail = log.read_text(errors="replace")[-600:] if log.is_file() else ""
            progress = {**progress, "state": "failed",
                        "error": progress.get("error") or f"process ended unexpectedly. {tail}"}
    return progress


def stop_experiment(folder: str | Path) -> bool:
    """Ask the experiment's process to stop (SIGTERM to its session). False if not running."""
    import os
    import signal

    from engine import jobs

    info = jobs.cli_process(Path(folder))
    if not info.get("alive"):
        return False
    try:
        os.killpg(info["pid"], signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    write_progress(Path(folder), state="stopped", error="stopped by the user",
                   finished=time.time())
    return True
