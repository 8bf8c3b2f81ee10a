"""A MIL experiment: several data sets x methods, cross-validated, written to one results folder.

This is what ``python -m engine mil`` runs in the foreground, and what a background job with a
:class:`~engine.job_spec.MilSpec` runs (from the app) under ``<run store>/_mil/<name>/``. The
results folder is the experiment's job folder (:mod:`engine.jobs`): its ``status.json`` tells
a poller which (data set, method) is running and how far the whole experiment is, and
``results.*`` grow as each pair finishes.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from engine.budget import holding
from engine.job_spec import MilSpec
from engine.job_status import Status
from engine.jobs import Job, spawned_job
from engine.mil.config import MilConfig
from engine.mil.data import BENCHMARKS, load_mil_dataset
from engine.mil.models import MIL_METHODS
from engine.mil.protocol import cross_validate
from engine.mil.results import write_results
from engine.runs import default_runs_root
from engine.slots import store_root_of

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
                   out: str | Path, data_root: str | None = None, threads: int | None = None,
                   log: Callable[[str], None] = print) -> list[dict]:
    """Cross-validate every (data set, method) with ``config`` (its ``method`` is replaced);
    results are merged into ``out`` after each pair. Returns the new rows (without weights).

    ``out`` is this experiment's job folder: its status says how far it is, and a stop
    (SIGTERM, its STOP file) or an error ends it as ``stopped`` or ``failed``."""
    out = Path(out)
    # Every set is read before anything is written: a bad name or file leaves ``out`` alone.
    loaded = {d: load_mil_dataset(d, data_root, seed=config.seed) for d in datasets}
    tasks = [(d, m) for d in datasets for m in methods]
    job = Job(out)
    rows = []
    # A background experiment holds its store's slot; one in the foreground counts in the
    # default store's. Its threads: ``threads``, or its share of the cores.
    root = store_root_of(out) if spawned_job() is not None else default_runs_root()
    with holding(root, out, threads), \
            job.attach(finish=True, kind="mil", tasks=len(tasks), task=0, fraction=0.0,
                       current=None, datasets=list(datasets), methods=list(methods),
                       config=config.to_dict()):
        started = time.time()
        for i, (dataset, method) in enumerate(tasks):
            data = loaded[dataset]
            label = f"{data.name}/{method}"

            def progress(fraction: float, i: int = i, label: str = label) -> None:
                job.update(task=i, current=label, fraction=round((i + fraction) / len(tasks), 4))

            progress(0.0)
            row = cross_validate(data, dataclasses.replace(config, method=method), progress)
            row["threads"] = torch.get_num_threads()
            write_results(out, [row])
            rows.append({k: v for k, v in row.items() if k != "bag_weights"})
            log(f"{data.name:10s} {method:16s} accuracy {row['accuracy_mean']:.3f} ± "
                f"{row['accuracy_std']:.3f}  ({row['folds_done']} folds, {row['seconds']:.0f} s)")
        job.update(task=len(tasks), fraction=1.0, current=None,
                   seconds=round(time.time() - started, 1))
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


def start_experiment(runs_root: str | Path, name: str, datasets: Sequence[str],
                     methods: Sequence[str], config: MilConfig, data_root: str | None = None,
                     threads: int | None = None) -> Path:
    """Start the experiment in a background process; returns its folder. Refuses a name that
    is taken by an experiment still running."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"experiment name must be 1-80 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit; got {name!r}")
    folder = mil_root(runs_root) / name
    spec = MilSpec(datasets=list(datasets), methods=list(methods), config=config,
                   out=str(folder.resolve()), data_root=str(data_root) if data_root else None,
                   threads=threads or None)
    Job(folder).spawn(spec, kind="mil", fraction=0.0, task=0,  # refused if it is running
                      tasks=len(datasets) * len(methods), current="starting",
                      datasets=list(datasets), methods=list(methods))
    return folder


def experiment_status(folder: str | Path) -> Status:
    """The experiment's status (``state``, ``reason``, ``fraction``, ``task``, ``current``);
    one whose process has gone is reported as failed (or stopped) at once."""
    return Job(folder).status()


def stop_experiment(folder: str | Path) -> bool:
    """Ask the experiment's process to stop. False if it was not running."""
    return Job(folder).stop()
