"""Sweep: a γmax x ξ grid (the paper's Table VI and Fig. 7), trained in the background, shown as
heat maps of accuracy and patch precision / recall / F."""

import contextlib
import math

import streamlit as st

from engine.cluster import CellResources, RayExecutor
from engine.jobs import LIVE, State
from engine.losses import patch_loss_share
from engine.metric_table import metrics_of
from engine.sweep import (
    MAX_SEEDS,
    SEED_FIELD,
    cell_seconds,
    evaluate_cell,
    launch_sweep,
    list_sweeps,
    parse_grid_notes,
    read_manifest,
    resolve_parallel,
    seed_groups,
    stop_sweep,
    sweep_folder,
    sweep_runs,
    sweep_status,
    sweep_table,
    with_seeds,
)
from engine.train import prepare_run_config
from ui.figures import FIELD_LABELS, at_chance, grid_heatmap
from ui.overlay import csv_bytes
from ui.st_forms import (
    config_of,
    first_visit_preset,
    format_seconds,
    preset_picker,
    queue_note,
    run_settings,
)
from ui.st_guards import guard
from ui.st_links import ensure_router
from ui.st_models import store
from ui.st_session import keep, remember
from ui.st_watch import explore_run, look_at_queue

WATCH_KEY = "sw_watch"
RATES = [(m.key, m.label) for m in metrics_of("summary") if m.better == "higher"]
FIELDS = ("model.backbone", "train.epochs", "train.batch_size", "data.train_size")  # in the form


def launch_form() -> None:
    first_visit_preset("sw", FIELDS)
    with st.container(border=True):  # no st.form: its widgets could not remember values
        preset = preset_picker("sw", FIELDS, given=("model.xi", "loss.gamma_max"))  # the grid
        settings = run_settings("sw", gamma_xi=False)
        c1, c2, c3, c4 = st.columns(4)
        gammas = c1.text_input("γmax values", **keep("sw_gammas", "0, 0.1"))
        xis = c2.text_input("ξ values", **keep("sw_xis", "0, 0.1"))
        seeds = int(c3.number_input(
            "Seeds per cell", 1, MAX_SEEDS, step=1, **keep("sw_seeds", 1),
            help="Each cell trained with this many seeds (the seed above, +1, ...): the heat "
                 "maps show mean ± sd, and which cells are within the seeds' spread of the "
                 "best."))
        name = c4.text_input("Sweep name", **keep("sw_name", "gamma-xi"))
        executor = ray_settings()
        with guard("The plan", stop=False):
            plan_notes(settings, preset, gammas, xis, seeds, executor)
        submitted = st.button("Launch sweep", type="primary", key="sw_launch")
    if submitted:
        with guard("Launching the sweep", stop=False):
            base = config_of(settings, preset=preset or None)
            grid = with_seeds(sweep_grid(gammas, xis)[0], seeds, base.train.seed)
            launch_sweep(store(), base, grid, name.strip(), parallel="auto", ray=executor)
            remember(WATCH_KEY, name.strip())
            cells = len(grid[0][1]) * len(grid[1][1]) * seeds
            where = ("as tasks on the Ray cluster" if executor else
                     f"in the background, {resolve_parallel('auto')} at a time")
            st.success(f"Sweep {name} started: {cells} runs, {where}.")


def ray_settings() -> RayExecutor | None:
    """The cells as Ray tasks instead of one after another here (docs/scale-out.md, Ray)."""
    if not st.toggle("Train the cells on a Ray cluster", **keep("sw_ray", False),
                     help="Each cell a Ray task. The run store must be on a filesystem every "
                          "node mounts; a worker that dies is retried and resumes."):
        return None
    c1, c2, c3 = st.columns(3)
    address = c1.text_input("Cluster address", **keep("sw_ray_address", ""),
                            placeholder="host:port, auto, or empty: a local Ray")
    cpus = c2.number_input("CPUs per cell", min_value=1, **keep("sw_ray_cpus", 1))
    gpus = c3.number_input("GPUs per cell", min_value=0, **keep("sw_ray_gpus", 0))
    return RayExecutor(address.strip() or None, CellResources(float(cpus), float(gpus)))


def sweep_grid(gammas: str, xis: str) -> tuple[list[tuple[str, list]], list[str]]:
    """The γmax × ξ grid as typed, numbers only, with repeated values merged (and a note for
    each axis that had some: a repeat would train the same cell twice)."""
    grid, notes = parse_grid_notes([f"loss.gamma_max={gammas.replace(' ', '')}",
                                    f"model.xi={xis.replace(' ', '')}"])
    for field, values in grid:
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{field} values must be numbers; got {values}")
    return grid, notes


def plan_notes(settings: dict, preset: str, gammas: str, xis: str, seeds: int,
               executor: RayExecutor | None) -> None:
    """Before launch: the preset the cells train with, what the grid will cost here, and
    whether γmax can act at all."""
    config = prepare_run_config(config_of(settings, preset=preset or None))
    grid, merged = sweep_grid(gammas, xis)
    for note in merged:
        st.info(f"Repeats merged: {note}")
    cells = len(grid[0][1]) * len(grid[1][1]) * seeds
    st.caption(f"Every cell trains with preset **{preset or 'none'}** "
               f"({config.train.epochs} epochs, batch {config.train.batch_size}, recipe "
               f"{config.train.recipe}), exactly as `python -m engine sweep"
               f"{f' --preset {preset}' if preset else ' --preset none'}` would.")
    at_once = "as Ray tasks" if executor else f"{min(cells, resolve_parallel('auto'))} at a time"
    seconds, basis = cell_seconds(store(), config)
    if seconds is None:
        st.caption(f"{cells} cells, {at_once}. Time: unknown ({basis}); the first "
                   "cell's speed sets the ETA on its progress bar.")
    else:
        st.caption(f"{cells} cells, {at_once}: about {format_seconds(cells * seconds)} of "
                   f"training one after another ({format_seconds(seconds)} a cell: {basis}); "
                   "side by side they share the cores and end sooner.")
    loss = config.loss
    share = patch_loss_share(1.0, loss.ramp_epochs, loss.ramp_by, config.train.epochs)
    if share == 0:
        st.warning(f"With {config.train.epochs} epoch(s) and the ramp by epoch, the patch-loss "
                   "weight w(τ) is 0 for the whole run (w(0) = 0): every γmax trains the same "
                   "model, and the γmax rows come out identical. Train for 2+ epochs, or ramp "
                   "by step (the live preset does).")
    elif share < 0.3:
        st.info(f"Over {config.train.epochs} epochs the ramp gives the patch loss on average "
                f"{share:.0%} of γmax: γmax acts, but weakly (a ramp of "
                f"{loss.ramp_epochs} epochs).")


@st.fragment(run_every=2.0)
def progress(sweep: str) -> None:
    with guard("The sweep's progress", stop=False):
        look_at_queue()
        runs = sweep_runs(store(), sweep)
        states = [r.status().state for r in runs]
        process = sweep_status(store(), sweep)  # the sweep's job status, read once per tick
        cells = process.fields.get("cells") or len(runs)
        done = states.count(State.FINISHED)
        alive = process.state in LIVE
        where = " on Ray" if process.fields.get("executor") == "ray" else " in the background"
        waiting = states.count(State.QUEUED)
        st.progress(done / max(cells, 1), text=f"{done}/{cells} runs finished"
                    + (f", training{where}" if alive else "")
                    + (f"; {waiting} waiting in the queue for a slot" if waiting else "")
                    + ("; the sweep itself is " + queue_note(sweep_folder(store(), sweep))
                       if process.state == State.QUEUED else ""))
        if State.FAILED in states:
            failed = [r.name for r, s in zip(runs, states, strict=True) if s == State.FAILED]
            st.error("Failed: " + ", ".join(failed) + " (see the Runs page for the reason).")
        seen = st.session_state.setdefault("sw_done_seen", {})
        if seen.get(sweep, done) != done:  # a cell finished: redraw the heat maps
            seen[sweep] = done
            st.rerun(scope="app")
        seen[sweep] = done
        if alive and st.button("Stop the sweep", key="sw_stop"):
            stop_sweep(store(), sweep)
            st.toast("Stopping: the training run checkpoints and stops; launch again to resume.")


@st.cache_data(show_spinner="Evaluating a finished run...", max_entries=512)
def _cell(root: str, name: str, checkpoint_mtime_ns: int, xi: float | None) -> dict:
    del root, checkpoint_mtime_ns  # cache key: a new best checkpoint is evaluated again
    return evaluate_cell(store().get(name), xi=xi)


def report_of(sweep: str, xi: float | None = None) -> dict:
    """The sweep's table at each cell's own ξ, or every trained cell re-thresholded at ``xi``
    (no retraining); each run is evaluated once per best checkpoint and ξ (cached), so a newly
    finished cell costs one evaluation."""
    def cached_cell(run) -> dict:
        if not run.best_checkpoint.is_file():
            return {}
        return _cell(str(store().root), run.name, run.best_checkpoint.stat().st_mtime_ns, xi)

    return sweep_table(store(), sweep, cached_cell)


def heat_maps(report: dict) -> None:
    """One heat map per rate over the grid (mean ± sd over seeds), each on its natural colour
    range; cells at chance say so; the table and its CSV below."""
    groups = seed_groups(report)
    fields = [f for f in report["fields"] if f != SEED_FIELD] or ["run"]
    if not any(g["states"].get(State.FINISHED) for g in groups):
        st.info("No finished run in this sweep yet.")
        return
    x_field = fields[-1]
    y_field = fields[0] if len(fields) > 1 else None
    if y_field is None:
        for g in groups:
            g["sweep"] = report["sweep"]
        y_field = "sweep"
    seeded = SEED_FIELD in report["fields"]
    chance = _chance(report)
    shown = [(key, label) for key, label in RATES if any(key in g for g in groups)]
    st.caption("Each cell: " + ("mean ± sd over its seeds; **≈ best**: its seeds reach into "
                                "the best cell's, a difference within the seeds' spread"
                                if seeded else "one run (add seeds to see the spread)")
               + ". Colours: rates on 0 to 1, the same for every sweep, so noise stays one "
               "colour. Rows: γmax, which needs training; columns: ξ, as trained or as "
               "re-thresholded. A cell without a value shows its runs' state.")
    nothing = [g for g in groups if chance and _finite(g.get("accuracy"))
               and at_chance(g["accuracy"], chance)]
    if nothing:
        st.warning("Learned nothing (more epochs or data): " + "; ".join(
            f"{', '.join(f'{FIELD_LABELS.get(f, f)} = {g.get(f)}' for f in fields)} at "
            f"accuracy {g['accuracy']:.3f}" for g in nothing)
            + f", no better than guessing ({chance:.3f}).")
    columns = st.columns(min(3, len(shown)) or 1)
    for i, (key, label) in enumerate(shown):
        with columns[i % len(columns)]:
            st.plotly_chart(grid_heatmap(groups, x_field, y_field, key, label,
                                         chance=chance if key == "accuracy" else None),
                            key=f"sw_heat_{key}")
    finished = [r for r in report["rows"] if r.get("state") == State.FINISHED]
    if finished and st.button("Slide over these cells in the Patch Explorer",
                              key="sw_explore", help="Opens a finished cell; the Explorer's "
                              "γmax slider then moves over the cells beside it."):
        explore_run(finished[0]["run"])
    st.dataframe(report["rows"], hide_index=True)
    st.download_button("Sweep table CSV", csv_bytes(report["rows"]), f"{report['sweep']}.csv",
                       "text/csv", key="sw_dl")


def _chance(report: dict) -> float | None:
    """The accuracy of guessing: 1 / the number of classes of the sweep's models."""
    for row in report["rows"]:
        with contextlib.suppress(ValueError, OSError):
            classes = store().get(row["run"]).config().model.num_classes
            return 1.0 / classes if classes else None
    return None


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


ensure_router()
st.title("Sweep")
st.caption("Each cell is an ordinary run tagged with the sweep (see Runs). Launching the same "
           "sweep again skips finished cells and resumes stopped ones.")
launch_form()
st.divider()
with guard("The sweep list"):
    sweeps = list_sweeps(store())
    if not sweeps:
        st.info("No sweep yet. The default grid is the paper's ablation: γmax ∈ {0, 0.1} x "
                "ξ ∈ {0, 0.1}.")
        st.stop()
    sweep = st.selectbox("Sweep", sweeps, **keep(WATCH_KEY, sweeps[0], sweeps))
    swept = read_manifest(store(), sweep)
    if swept:
        st.caption(f"Grid over {', '.join(swept)}; folder `{sweep_folder(store(), sweep)}`")
progress(sweep)
with guard("The sweep's heat maps"):
    if sweep_runs(store(), sweep):
        choices = ["each cell's own ξ", *[f"{v / 10:.1f}" for v in range(11)]]
        at = st.selectbox("Evaluate the trained cells at ξ", choices,
                          **keep("sw_eval_xi", choices[0], choices),
                          help="ξ only thresholds at inference: each trained cell can be "
                          "read at any ξ without retraining (γmax cannot: it shapes training).")
        heat_maps(report_of(sweep, None if at == choices[0] else float(at)))
