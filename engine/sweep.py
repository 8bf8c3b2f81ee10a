"""Sweeps: a grid of ordinary runs over any config fields, and its table.

The default grid is the paper's ablation (TIP Table VI): γmax ∈ {0, 0.1} x ξ ∈ {0, 0.1}. Each
cell is a run named ``<sweep>-NN-<values>`` and tagged ``sweep:<sweep>``, so the Runs page and
``runs list`` show it like any other. Runs train one after another on one device, or in
parallel with one process per visible GPU. Running the same sweep again skips finished runs and
resumes stopped or killed ones.

``sweep_report`` evaluates each run's best checkpoint on its test set (image metrics, patch
precision / recall / F at the run's ξ, localization where defined) and writes
``<runs>/_sweeps/<sweep>/report.json`` and ``report.csv``.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import re
import time

import torch

from engine.cluster import CellResources, RayExecutor, import_ray
from engine.config import (
    SECTIONS,
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    parse_value,
    split_setting,
)
from engine.fsutil import write_json_atomic
from engine.job_spec import SweepSpec
from engine.job_status import LIVE, State, Status
from engine.jobs import Job, JobStopped, dispatch
from engine.launch import start
from engine.metric_table import metrics_of
from engine.preset_fill import fill_preset
from engine.presets import CONTEXT_FIELDS
from engine.runs import Run, RunStore
from engine.safe_io import read_json
from engine.train import check_machine, prepare_run_config, train_run

logger = logging.getLogger(__name__)
DEFAULT_GRID = [("loss.gamma_max", [0.0, 0.1]), ("model.xi", [0.0, 0.1])]
SEED_FIELD = "train.seed"
"""A grid axis over this field repeats each cell with other seeds: tables give mean ± sd."""
MAX_SEEDS = 20


def with_seeds(grid: list[tuple[str, list]], seeds: int, first: int = 0
               ) -> list[tuple[str, list]]:
    """``grid`` with each cell repeated for ``seeds`` seeds (``first``, ``first + 1``, ...;
    ``--seeds``). One seed leaves the grid as it is."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds must be an int from 1 to {MAX_SEEDS} (runs per cell); "
                          f"got {seeds!r}")
    if seeds == 1:
        return grid
    if any(field == SEED_FIELD for field, _ in grid):
        raise ConfigError(f"--seeds {seeds} and --grid {SEED_FIELD}=... both give the seeds; "
                          "use one of them")
    return [*grid, (SEED_FIELD, list(range(first, first + seeds)))]


def parse_grid(items: list[str]) -> list[tuple[str, list]]:
    """``["loss.gamma_max=0,0.1", "model.head=loss_attention,mean"]`` -> [(field, values)].

    Values are JSON where they parse (numbers, true/false, lists), else strings. A value list
    that is itself a JSON array (``model.stride_plan=[[1,1,1,1],[1,2,1,1]]``) is taken whole.
    A value given twice is trained once; each merge is logged (:func:`parse_grid_notes`
    returns the notes, for a caller that shows them)."""
    grid, notes = parse_grid_notes(items)
    for note in notes:
        logger.warning("%s", note)
    return grid


def parse_grid_notes(items: list[str]) -> tuple[list[tuple[str, list]], list[str]]:
    """:func:`parse_grid`'s grid, and one note per axis whose repeated values were merged
    (numbers by value: ``0.1`` and ``0.10`` are one value)."""
    grid = []
    for item in items:
        section, key, text = split_setting(item, "--grid")
        if text.strip().startswith("[["):
            values = parse_value(text)
            if not isinstance(values, list):
                raise ConfigError(f"--grid {section}.{key}: {text!r} is not a JSON list of lists")
        else:
            values = [parse_value(v) for v in text.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--grid {section}.{key} has no values")
        grid.append((f"{section}.{key}", values))
    return merge_repeats(grid)


def merge_repeats(grid: list[tuple[str, list]]) -> tuple[list[tuple[str, list]], list[str]]:
    """Each axis with its repeated values dropped (the first kept, order kept), and a note per
    axis that had any: a repeat would only train identical cells again."""
    merged, notes = [], []
    for field, values in grid:
        seen: dict = {}
        for value in values:
            seen.setdefault(_value_key(value), value)
        kept = list(seen.values())
        dropped = len(values) - len(kept)
        if dropped:
            shown = ", ".join(json.dumps(v) for v in kept[:6]) + (", ..." if len(kept) > 6 else "")
            notes.append(f"{field}: {dropped} repeated value(s) merged; each value is "
                         f"trained once ({len(kept)} distinct: {shown})")
        merged.append((field, kept))
    return merged, notes


def _value_key(value):
    """A grid value's identity: numbers by value (``0.1 == 0.10``, ``1 == 1.0``; never a bool),
    lists by their items, anything else by its JSON."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)  # 1 and 1.0 are equal and hash alike
    if isinstance(value, list | tuple):
        return ("list", tuple(_value_key(v) for v in value))
    return ("json", json.dumps(value, sort_keys=True))


def _short(value) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", json.dumps(value))[:12] or "x"


def sweep_configs(base: RunConfig | dict, grid: list[tuple[str, list]], sweep: str
                  ) -> list[RunConfig]:
    """One validated RunConfig per grid cell.

    ``base`` is either the settings the user gave, not yet validated (the CLI's: a config file
    and flags): then each cell fills its preset after taking the grid's values, so a grid over
    ``model.head`` or ``data.dataset`` gets each head's and data set's preset fields, and a
    grid value wins over the preset like any value the user gave. Or a RunConfig, in which
    every field counts as given, so its preset adds nothing per cell; with a preset and a grid
    over a field the preset depends on that would keep the base's preset fields in every cell,
    so it is refused."""
    _check_name(sweep)
    grid, notes = merge_repeats(grid)  # a grid made by a page, not parsed: the same rule
    for note in notes:
        logger.warning("%s", note)
    if isinstance(base, RunConfig):
        _check_preset_grid(base, grid)
    base_dict = copy.deepcopy(base) if isinstance(base, dict) else config_to_dict(base)
    configs = []
    for i, values in enumerate(itertools.product(*(v for _, v in grid))):
        data = copy.deepcopy(base_dict)
        parts = []
        for (path, _), value in zip(grid, values, strict=True):
            section, key = path.split(".", 1)
            if not isinstance(data.get(section), dict):  # "transfer": null on the base
                data[section] = {}
            data[section][key] = value
            parts.append(f"{key.split('_')[0][:5]}{_short(value)}")
        data["name"] = f"{sweep}-{i:02d}-" + "-".join(parts)
        data["tags"] = sorted({*data.get("tags", []), f"sweep:{sweep}"})
        configs.append(config_from_dict(RunConfig, fill_preset(data)))
    return configs


def _check_preset_grid(base: RunConfig, grid: list[tuple[str, list]]) -> None:
    swept = [path for path, _ in grid if path in CONTEXT_FIELDS]
    if base.preset is not None and swept:
        raise ConfigError(
            f"a sweep over {', '.join(swept)} with preset {base.preset!r} needs the settings "
            "before the preset filled them (pass them as a dict, as `python -m engine sweep "
            "--preset` does), so that each cell gets its own preset fields")


def _runnable(store: RunStore, config: RunConfig, machine: bool = True
              ) -> tuple[Run, bool] | None:
    """The run to train for ``config`` and whether it resumes; None if already finished.
    ``machine``: the cell trains on this machine, which must have its device."""
    if not store.exists(config.name):
        return store.create(prepare_run_config(config, machine=machine)), False
    run = store.get(config.name)
    state = run.status().state
    if state == State.FINISHED:
        return None
    if state in LIVE:
        raise ConfigError(f"run {config.name} of this sweep is {state}; stop it or wait")
    return run, state != State.CREATED


SWEEP_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}"


def _check_name(sweep: object) -> None:
    if not isinstance(sweep, str) or not re.fullmatch(SWEEP_NAME_PATTERN, sweep):
        raise ConfigError(f"sweep name must be 1-41 letters, digits, '.', '_' or '-'; "
                          f"got {sweep!r}")


def sweep_folder(store: RunStore, sweep: str):
    _check_name(sweep)  # a name (even from a run's tag) never leads out of _sweeps/
    return store.root / "_sweeps" / sweep


def write_manifest(store: RunStore, sweep: str, grid: list[tuple[str, list]]) -> None:
    """Remember which fields the user swept, so the report leads with them (a head change also
    changes the recipe's lr and optimizer; those are reported as derived, not as the grid)."""
    folder = sweep_folder(store, sweep)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "grid.json", {"sweep": sweep, "grid": grid})


def read_manifest(store: RunStore, sweep: str) -> list[str] | None:
    """The swept fields, or None for a sweep without a readable manifest."""
    try:
        data = read_json(sweep_folder(store, sweep) / "grid.json", "a sweep grid")
        return [str(field) for field, _ in data["grid"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_parallel(text: int | str) -> int:
    """``--parallel``: a positive int, or ``auto``: one cell per visible GPU, or on a CPU as
    many as the store's job limit (``$LOSSATTN_MAX_JOBS``)."""
    if text == "auto":
        from engine.slots import job_limit

        return torch.cuda.device_count() or job_limit()
    if isinstance(text, bool) or not str(text).isdigit() or int(text) < 1:
        raise ConfigError(f"--parallel must be a positive int or auto; got {text!r}")
    return int(text)


def launch_sweep(store: RunStore, base: RunConfig, grid: list[tuple[str, list]], sweep: str,
                 parallel: int | str = 1, ray: RayExecutor | None = None) -> int | None:
    """Train and tabulate a sweep in a background job (a :class:`~engine.job_spec.SweepSpec`,
    what ``python -m engine sweep`` does: :func:`sweep_and_report`); returns
    its pid (None while it waits in the store's queue). The cells are ordinary runs, so
    progress is read from the run store; the sweep's own job folder is ``_sweeps/<sweep>/``
    (status, process.log, STOP). ``ray``: its cells are tasks on that Ray cluster (address and
    resources; the process polls its own STOP)."""
    grid, _ = merge_repeats(grid)  # sweep_configs logs the notes
    configs = sweep_configs(base, grid, sweep)  # validate here, where the caller shows errors
    if ray is not None:
        import_ray()  # a missing optional extra is said here, not in the process's log
    else:
        check_cells_machine(configs)
    for config in configs:
        state = store.get(config.name).status().state if store.exists(config.name) else None
        if state in LIVE:
            raise ConfigError(f"run {config.name} of sweep {sweep!r} is already {state}")
    job = sweep_job(store, sweep)
    state = job.status().state
    if state in LIVE:
        raise ConfigError(f"sweep {sweep!r} is already {state}")
    write_manifest(store, sweep, grid)
    folder = sweep_folder(store, sweep)
    write_json_atomic(folder / "base.json", config_to_dict(base))
    spec = SweepSpec(
        runs_dir=str(store.root.resolve()), sweep=sweep,
        config=str((folder / "base.json").resolve()), grid=grid, parallel=parallel,
        **({} if ray is None else {
            "executor": "ray", "ray_address": ray.address or None, "ray_cpus": ray.resources.cpus,
            "ray_gpus": ray.resources.gpus, "ray_retries": ray.resources.max_retries}))
    # One after another, the sweep's process trains the cells itself and takes a slot; side by
    # side (or on Ray) it only watches cells that are jobs of their own.
    serial = ray is None and resolve_parallel(parallel) == 1
    identity = job.spawn(spec, compute=serial, kind="sweep",
                         cells=len(configs), executor="ray" if ray is not None else "local")
    return None if identity is None else identity.pid


def check_cells_machine(configs: list[RunConfig]) -> None:
    """Every cell's device on this machine, before any cell's run folder is made (a Ray
    sweep's cells train on its nodes: not checked here)."""
    for config in configs:
        check_machine(config)


def sweep_and_report(store: RunStore, data: dict | RunConfig, grid: list[tuple[str, list]],
                     sweep: str, parallel: int | str = 1, *, ray_address: str | None = None,
                     ray_resources: CellResources | None = None, device_eval: str = "auto",
                     progress_bar: bool = True, log=print) -> dict:
    """What ``python -m engine sweep`` does once its settings are read, in the foreground or as
    the sweep's background job: train every cell of ``data`` x ``grid`` (``ray_resources``:
    as tasks on that Ray cluster) as the sweep's own job, and evaluate them into the report,
    which it returns. The report is part of the job: ``finished`` means the table is there."""
    configs = sweep_configs(data, grid, sweep)
    if ray_resources is None:  # a Ray cell trains on its node, with that node's devices
        check_cells_machine(configs)
    parallel = resolve_parallel(parallel)
    log(f"sweep {sweep}: {len(configs)} runs")
    write_manifest(store, sweep, grid)
    # The sweep's own job, in the foreground too (the Sweep page sees it and can stop it).
    job = sweep_job(store, sweep)
    ray = None if ray_resources is None else RayExecutor(ray_address, ray_resources,
                                                          job.stop_requested)
    with job.attach(finish=True, kind="sweep", cells=len(configs),
                    executor="local" if ray is None else "ray"):
        run_sweep(store, configs, parallel, progress_bar=progress_bar, log=log, ray=ray)
        return report_with_slot(store, sweep, device_eval)


def report_with_slot(store: RunStore, sweep: str, device_eval: str = "auto") -> dict:
    """:func:`sweep_report` on ``device_eval``, with a slot of the store (the sweep's process
    may only have watched its cells)."""
    from engine.budget import holding
    from engine.device import resolve_device

    with holding(store.root, sweep_folder(store, sweep)):
        device = resolve_device(device_eval, "--device-eval")
        return sweep_report(store, sweep, device)


def sweep_job(store: RunStore, sweep: str) -> Job:
    """The sweep's own job (the process that trains its cells one after another)."""
    return Job(sweep_folder(store, sweep))


def sweep_status(store: RunStore, sweep: str) -> Status:
    """The sweep process's status (state, reason; its fields: cells, executor);
    :attr:`~engine.job_status.Status.missing` if it was never started."""
    return sweep_job(store, sweep).status()


def sweep_process_alive(store: RunStore, sweep: str) -> bool:
    """Whether the sweep's process runs, or waits in the store's queue to run."""
    return sweep_status(store, sweep).state in LIVE


def stop_sweep(store: RunStore, sweep: str) -> None:
    """Stop the sweep's process (no new cells start) and every cell that is training. A cell
    that the sweep's own process trains only gets the STOP request: one SIGTERM per process.
    A live Ray driver stops its cells itself: it must cancel the queued ones before a stopped
    cell frees its CPUs, or Ray would start one of them there."""
    job = sweep_job(store, sweep)
    status = job.status()
    process = status.process
    if job.stop() and status.fields.get("executor") == "ray":
        return
    for run in sweep_runs(store, sweep):
        if process is not None and process.matches(run.job.process()):
            run.request_stop()
        else:
            store.stop(run.name)


def list_sweeps(store: RunStore) -> list[str]:
    """Sweeps with a folder or tagged runs, newest folder first."""
    folders = store.root / "_sweeps"
    names = [p.name for p in sorted(folders.iterdir(), key=lambda p: p.stat().st_mtime,
                                    reverse=True)] if folders.is_dir() else []
    for row in store.list():
        for tag in row["tags"]:
            name = tag[6:]
            if (tag.startswith("sweep:") and name not in names
                    and re.fullmatch(SWEEP_NAME_PATTERN, name)):
                names.append(name)
    return names


def run_sweep(store: RunStore, configs: list[RunConfig], parallel: int = 1,
              progress_bar: bool = True, log=print, ray: RayExecutor | None = None
              ) -> list[Run]:
    """Train every cell. ``parallel`` > 1: that many background processes at once, each pinned
    to one GPU when CUDA is there (``CUDA_VISIBLE_DEVICES``); ``ray``: as tasks on a Ray
    cluster instead. A stop (SIGTERM or the sweep's STOP file) stops the cells in training and
    raises :class:`engine.jobs.JobStopped`."""
    if ray is None:
        check_cells_machine(configs)  # all of them before the first cell's folder is made
    pending = [(c, _runnable(store, c, machine=ray is None)) for c in configs]
    todo = [item for _, item in pending if item is not None]
    for config, item in pending:
        if item is None:
            log(f"{config.name}: finished earlier, skipped")
    if ray is not None:
        from engine.cluster import run_sweep_ray

        run_sweep_ray(store, todo, ray.resources, ray.address, ray.stop_requested, log)
        stopped = [r.name for r, _ in todo if r.status().state == State.STOPPED]
        if stopped:  # a cell stopped from outside (its own STOP): the sweep stops, as locally
            raise JobStopped(f"cell(s) {', '.join(stopped)} stopped; run the sweep again to "
                             "resume")
    elif parallel <= 1:
        for run, resume in todo:
            log(f"{run.name}: training")
            state = train_run(run, resume=resume, progress_bar=progress_bar, console=False,
                              on_status=store.index)
            log(f"{run.name}: {state}")
            if state == State.STOPPED:  # a stop request (SIGTERM, stop file) stops the sweep too
                raise JobStopped(f"stopped at cell {run.name}; run the sweep again to resume")
    else:
        _run_parallel(store, todo, parallel, log)
    # A cell whose folder was removed while it trained ended failed and is gone.
    return [store.get(c.name) for c in configs if store.exists(c.name)]


def _run_parallel(store: RunStore, todo: list[tuple[Run, bool]], parallel: int, log) -> None:
    """At most ``parallel`` cells at once, each a background job (on the GPU of its slot when
    there are GPUs); a cell waits in the store's queue while its slots are taken by other
    jobs, so a sweep shares the cores with everything else the store runs."""
    gpus = torch.cuda.device_count()
    active: dict[int, Run] = {}
    queue = list(todo)
    try:
        while queue or active:
            for slot in range(parallel):
                if slot not in active and queue:
                    run, resume = queue.pop(0)
                    env = {"CUDA_VISIBLE_DEVICES": str(slot % gpus)} if gpus else {}
                    active[slot] = run  # before it starts: an error in between still stops it
                    started = start(store, run, resume=resume, env=env)
                    log(f"{run.name}: " + (f"started (slot {slot})" if started else "queued"))
            for slot, run in list(active.items()):
                state = run.status().state
                if state not in LIVE:
                    log(f"{run.name}: {state}")
                    del active[slot]
            dispatch(store.root)  # a look: starts what a killed job's slot held back
            time.sleep(0.5)
    except BaseException:  # a stop or an error: the cells are processes of their own
        for run in active.values():
            run.job.stop()
        raise


def sweep_runs(store: RunStore, sweep: str) -> list[Run]:
    tag = f"sweep:{sweep}"
    return [store.get(r["name"]) for r in sorted(store.list(), key=lambda r: r["name"])
            if tag in r["tags"]]


TOP_LEVEL_FIELDS = ("preset",)
"""Run-config fields outside the sections that tables compare (a run's preset)."""


def varied_fields(runs: list[Run]) -> list[str]:
    """Config fields (``preset``, section.key) whose values differ between the runs; read one
    with :func:`config_value`."""
    dicts = [run.config_dict() for run in runs]
    fields = [name for name in TOP_LEVEL_FIELDS
              if len({json.dumps(d.get(name)) for d in dicts}) > 1]
    for section in SECTIONS:
        keys = sorted({k for d in dicts for k in (d.get(section) or {})})
        for key in keys:
            values = {json.dumps((d.get(section) or {}).get(key)) for d in dicts}
            if len(values) > 1:
                fields.append(f"{section}.{key}")
    return fields


def config_value(config: dict, field: str):
    """The value of a field named as :func:`varied_fields` names it, in a config.json dict
    (None where the field or its section is absent)."""
    section, dot, key = field.partition(".")
    if not dot:
        return config.get(field)
    part = config.get(section)
    return part.get(key) if isinstance(part, dict) else None


def evaluate_cell(run: Run, device: torch.device | None = None, xi: float | None = None) -> dict:
    """Test metrics of one run's best checkpoint at its own ξ, or at ``xi`` (a trained cell
    re-thresholded, no retraining) ({} before it has a checkpoint)."""
    from engine.checkpoint import load_model
    from engine.config import DataConfig
    from engine.data import load_split
    from engine.evaluate import evaluate_model, summary_rows

    if not run.best_checkpoint.is_file():
        return {}
    device = device or torch.device("cpu")
    model, ckpt = load_model(run.best_checkpoint)
    data = load_split(config_from_dict(DataConfig, ckpt["run_config"]["data"]), "test")
    report = evaluate_model(model.to(device), data, device, pr_curves=False,
                            xi_grid=None if xi is None else [xi])
    rows = summary_rows(report)
    wanted = model.config.xi if xi is None or not model.xi_dependent else xi
    row = next(r for r in rows if r["xi"] == wanted)
    return {**row, "best_epoch": ckpt.get("metrics", {}).get("epoch")}


def cell_seconds(store: RunStore, config: RunConfig) -> tuple[float | None, str]:
    """A cell's expected training time on this machine, from the finished runs of the same
    model and data (their measured images/s; their image count where the config leaves the
    data set's own), and what the estimate rests on."""
    speeds, counts = [], []
    for row in store.list():
        if not (row.get("state") == State.FINISHED and row.get("dataset") == config.data.dataset
                and row.get("backbone") == config.model.backbone
                and row.get("head") == config.model.head):
            continue
        run = store.get(row["name"])
        progress = run.status().fields
        if progress.get("images_per_s"):
            speeds.append(float(progress["images_per_s"]))
        if run.config().data.train_size is None and progress.get("train_images"):
            counts.append(int(progress["train_images"]))
    images = config.data.train_size or (max(counts) if counts else None)
    if not speeds or not images:
        return None, ("no finished run of this model on this data yet to time it by"
                      if not speeds else "the data set's size is not known before it loads")
    speed = sorted(speeds)[len(speeds) // 2]
    return config.train.epochs * images / speed, (
        f"{config.train.epochs} epoch(s) x {images:,} images at {speed:,.0f} img/s, the median "
        f"of {len(speeds)} finished run(s) of {config.model.backbone}/{config.model.head} on "
        f"{config.data.dataset}; evaluation adds a little per epoch")


def sweep_table(store: RunStore, sweep: str, evaluate=evaluate_cell) -> dict:
    """The sweep's rows: swept fields first, then fields the recipe changed with them, then the
    metrics ``evaluate(run)`` returns (the app passes a cached version)."""
    runs = sweep_runs(store, sweep)
    if not runs:
        raise ConfigError(f"no runs tagged sweep:{sweep} in {store.root}")
    varied = varied_fields(runs)
    swept = read_manifest(store, sweep)
    fields = [f for f in swept if f in varied] if swept else varied
    derived = [f for f in varied if f not in fields]
    rows = []
    for run in runs:
        cfg = run.config_dict()
        row = {f: config_value(cfg, f) for f in fields + derived}
        row.update(run=run.name, state=run.status().state.value)
        row.update(evaluate(run))
        rows.append(row)
    return {"sweep": sweep, "fields": fields, "derived_fields": derived, "rows": rows}


def sweep_report(store: RunStore, sweep: str, device: torch.device | None = None) -> dict:
    """Evaluate every run of the sweep; write and return the table."""
    from engine.evaluate import json_safe, write_csv

    out = sweep_table(store, sweep, lambda run: evaluate_cell(run, device))
    folder = sweep_folder(store, sweep)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "report.json", json_safe(out))
    write_csv(folder / "report.csv", out["rows"])
    out["folder"] = str(folder)
    return out


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
        value)


def seed_groups(report: dict) -> list[dict]:
    """The sweep's cells over seeds (a grid axis over ``train.seed``): one row per combination
    of the other swept fields, in grid order, with for each metric its mean, its sample
    standard deviation (``KEY_sd``, n - 1; None for one value) and its values (``KEY_values``),
    the runs, and ``states`` (state -> count). Only finished runs give values: a failed or
    missing cell is a gap with its state, never a 0. Without a seed axis every run is a group
    of one."""
    fields = [f for f in report["fields"] if f != SEED_FIELD]
    metrics = [m.key for m in metrics_of("summary")]
    groups: dict[str, dict] = {}
    for row in report["rows"]:
        key = json.dumps([row.get(f) for f in fields])
        group = groups.setdefault(key, {**{f: row.get(f) for f in fields}, "runs": [],
                                        "states": {}, "_values": {m: [] for m in metrics}})
        group["runs"].append(row["run"])
        state = row.get("state") or "missing"
        group["states"][state] = group["states"].get(state, 0) + 1
        if state == State.FINISHED:
            for m in metrics:
                if _finite(row.get(m)):
                    group["_values"][m].append(float(row[m]))
    out = []
    for group in groups.values():
        values = group.pop("_values")
        group["n"] = max((len(v) for v in values.values()), default=0)
        for m, vs in values.items():
            if vs:
                group[m] = sum(vs) / len(vs)
                group[f"{m}_sd"] = (math.sqrt(sum((v - group[m]) ** 2 for v in vs)
                                              / (len(vs) - 1)) if len(vs) > 1 else None)
                group[f"{m}_values"] = vs
        out.append(group)
    return out


def format_sweep(report: dict) -> str:
    """The table as text: one line per cell, or per cell over its seeds with mean ± sd."""
    seeded = SEED_FIELD in report["fields"]
    rows = seed_groups(report) if seeded else report["rows"]
    fields = [f for f in report["fields"] if f != SEED_FIELD] if seeded else report["fields"]
    columns = [m.key for m in metrics_of("summary")]
    shown = [c for c in columns if any(c in r for r in rows)]
    width = 18 if seeded else 16
    header = [*fields, "runs" if seeded else "state", *shown]
    lines = ["  ".join(f"{h:>{width}s}" for h in header)]
    for r in rows:
        cells = [f"{json.dumps(r.get(f)):>{width}s}" for f in fields]
        # a cell that did not finish is a gap with its state, never a 0
        done = (f"{r['states'].get(State.FINISHED, 0)}/{len(r['runs'])} finished" if seeded
                else str(r.get("state") or "missing"))
        cells.append(f"{done:>{width}s}")
        for c in shown:
            v, sd = r.get(c), r.get(f"{c}_sd")
            text = "-" if not _finite(v) else f"{v:.4f}" + (
                f" ± {sd:.4f}" if seeded and sd is not None else "")
            cells.append(f"{text:>{width}s}")
        lines.append("  ".join(cells))
    if seeded:
        lines.append("mean ± sample sd over the finished seeds of each cell")
    return "\n".join(lines)

