"""``python -m engine job FOLDER``: run the job a folder's ``spec.json`` describes.

Every background job, whatever its kind, is started as this one command
(:meth:`engine.jobs.Job.spawn`). It reads the spec (:mod:`engine.job_spec`) and calls the
engine functions that the matching command of people's command line calls (``train --run-dir``,
``sweep``, ``bench``, ``mil``), so a job does in the background exactly what that command does
in the foreground. The command line (:func:`engine.cli.outcome.run_as_job`) attaches the process
to its job folder and records how it ended, as for any command.

Returns the process's exit code: 0 when the job did what it was asked (a training run that
was stopped on request included), 1 when a run failed; an error raises.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from engine.job_spec import BenchSpec, JobSpec, MilSpec, SpecError, SweepSpec, TrainSpec, read_spec
from engine.job_status import State
from engine.safe_io import JSON_CAP, read_json, read_text


def run_job(folder: str | Path) -> int:
    """Run the job in ``folder`` (its spec.json); SpecError when the spec is malformed."""
    spec = read_spec(folder)
    return RUNNERS[spec.kind](spec)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_train(spec: TrainSpec) -> int:
    """``python -m engine train --run-dir DIR [--resume] --quiet``."""
    from engine.runs import Run, RunStore
    from engine.train import train_run

    run = Run(Path(spec.run_dir))
    state = train_run(run, resume=spec.resume, progress_bar=False,
                      on_status=RunStore(run.path.parent).index, spawned=True)
    return 0 if state in (State.FINISHED, State.STOPPED) else 1


def run_sweep(spec: SweepSpec) -> int:
    """``python -m engine sweep --config BASE --sweep-name S --grid ... --quiet``."""
    from engine.cluster import CellResources
    from engine.config import RunConfig, config_from_dict
    from engine.device import check_device
    from engine.preset_fill import fill_preset
    from engine.runs import RunStore
    from engine.sweep import format_sweep, sweep_and_report

    store = RunStore(spec.runs_dir)
    check_device(spec.device_eval, "--device-eval")  # before the cells train, not after
    data = read_json(Path(spec.config), "a sweep's base config")
    if not isinstance(data, dict):
        raise SpecError(f"{spec.config} (the sweep's base config) must hold a JSON object")
    config_from_dict(RunConfig, fill_preset(data))  # the base alone: its error is its own
    grid = [(field, [_lists(v) for v in values]) for field, values in spec.grid]
    ray = None if spec.executor != "ray" else CellResources(
        spec.ray_cpus, spec.ray_gpus, spec.ray_retries)
    report = sweep_and_report(store, data, grid, spec.sweep, spec.parallel,
                              ray_address=spec.ray_address, ray_resources=ray,
                              device_eval=spec.device_eval, progress_bar=False, log=_say)
    print(format_sweep(report))
    _say(f"wrote {report['folder']}/report.json and report.csv")
    return 0


def _lists(value):
    return [_lists(v) for v in value] if isinstance(value, list | tuple) else value


def run_bench(spec: BenchSpec) -> int:
    """``python -m engine bench --models B/H,... --stride-plans ... --json FILE``."""
    from engine.bench import bench_models, format_table, results_as_dicts
    from engine.device import resolve_device
    from engine.fsutil import write_json_atomic

    device = resolve_device(spec.device, "--device")
    results = bench_models(
        list(spec.models), list(spec.stride_plans), device, batch=spec.batch, steps=spec.steps,
        warmup=spec.warmup, num_classes=spec.num_classes, input_size=spec.input_size,
        compare_fp32=spec.compare_fp32, compile_=spec.compile, isolate=spec.isolate, echo=_say)
    print(format_table(results))
    if spec.json:
        write_json_atomic(Path(spec.json), results_as_dicts(results))
    return 0


def run_mil(spec: MilSpec) -> int:
    """``python -m engine mil --dataset ... --method ... --out DIR --quiet``."""
    import dataclasses

    from engine.mil.experiment import parse_datasets, parse_methods, run_experiment

    methods = parse_methods(",".join(spec.methods))
    config = dataclasses.replace(spec.mil_config(), method=methods[0])
    run_experiment(parse_datasets(",".join(spec.datasets)), methods, config, spec.out,
                   spec.data_root, spec.threads, lambda line: None)
    print(read_text(Path(spec.out) / "results.md", JSON_CAP, "a results table"))
    return 0


RUNNERS: dict[str, Callable[[JobSpec], int]] = {
    TrainSpec.kind: run_train, SweepSpec.kind: run_sweep, BenchSpec.kind: run_bench,
    MilSpec.kind: run_mil}
