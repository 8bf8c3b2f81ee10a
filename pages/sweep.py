"""Sweep: a γmax x ξ grid (the paper's Table VI and Fig. 7), trained in the background, shown as
heat maps of accuracy and patch precision / recall / F."""

import streamlit as st

from engine.cluster import CellResources, RayExecutor
from engine.jobs import ACTIVE
from engine.losses import patch_loss_share
from engine.metric_table import metrics_of
from engine.sweep import (
    cell_seconds,
    evaluate_cell,
    launch_sweep,
    list_sweeps,
    parse_grid,
    read_manifest,
    stop_sweep,
    sweep_folder,
    sweep_runs,
    sweep_status,
    sweep_table,
)
from engine.train import prepare_run_config
from ui.figures import grid_heatmap
from ui.overlay import csv_bytes
from ui.st_forms import config_of, format_seconds, run_settings
from ui.st_state import ensure_router, guard, keep, remember, store

WATCH_KEY = "sw_watch"
RATES = [(m.key, m.label) for m in metrics_of("summary") if m.better == "higher"]


def launch_form() -> None:
    with st.container(border=True):  # no st.form: its widgets could not remember values
        settings = run_settings("sw", gamma_xi=False)
        c1, c2, c3 = st.columns(3)
        gammas = c1.text_input("γmax values", **keep("sw_gammas", "0, 0.1"))
        xis = c2.text_input("ξ values", **keep("sw_xis", "0, 0.1"))
        name = c3.text_input("Sweep name", **keep("sw_name", "gamma-xi"))
        executor = ray_settings()
        with guard("The plan", stop=False):
            plan_notes(settings, gammas, xis)
        submitted = st.button("Launch sweep", type="primary", key="sw_launch")
    if submitted:
        with guard("Launching the sweep", stop=False):
            grid = parse_grid([f"loss.gamma_max={gammas.replace(' ', '')}",
                               f"model.xi={xis.replace(' ', '')}"])
            for field, values in grid:
                if not all(isinstance(v, int | float) for v in values):
                    raise ValueError(f"{field} values must be numbers; got {values}")
            launch_sweep(store(), config_of(settings), grid, name.strip(), ray=executor)
            remember(WATCH_KEY, name.strip())
            where = ("as tasks on the Ray cluster" if executor else
                     "one after another, in the background")
            st.success(f"Sweep {name} started: {len(grid[0][1]) * len(grid[1][1])} runs, "
                       f"{where}.")


def ray_settings() -> RayExecutor | None:
    """The cells as Ray tasks instead of one after another here (README: Sweeps on Ray)."""
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


def _count(text: str) -> int:
    return len([v for v in text.split(",") if v.strip()])


def plan_notes(settings: dict, gammas: str, xis: str) -> None:
    """Before launch: what the grid will cost here, and whether γmax can act at all."""
    config = prepare_run_config(config_of(settings))
    cells = _count(gammas) * _count(xis)
    seconds, basis = cell_seconds(store(), config)
    if seconds is None:
        st.caption(f"{cells} cells, one after another. Time: unknown ({basis}); the first "
                   "cell's speed sets the ETA on its progress bar.")
    else:
        st.caption(f"{cells} cells, one after another: about {format_seconds(cells * seconds)} "
                   f"here ({format_seconds(seconds)} a cell: {basis}).")
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
        runs = sweep_runs(store(), sweep)
        states = [r.status().get("state") for r in runs]
        process = sweep_status(store(), sweep)  # the sweep's job status, read once per tick
        cells = process.get("cells") or len(runs)
        done = states.count("finished")
        alive = process.get("state") in ACTIVE
        where = " on Ray" if process.get("executor") == "ray" else " in the background"
        st.progress(done / max(cells, 1), text=f"{done}/{cells} runs finished"
                    + (f", training{where}" if alive else ""))
        if "failed" in states:
            failed = [r.name for r, s in zip(runs, states, strict=True) if s == "failed"]
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
    rows = [r for r in report["rows"] if r.get("state") == "finished"]
    fields = report["fields"] or ["run"]
    if not rows:
        st.info("No finished run in this sweep yet.")
        return
    x_field = fields[-1]
    y_field = fields[0] if len(fields) > 1 else None
    if y_field is None:
        for r in rows:
            r["sweep"] = report["sweep"]
        y_field = "sweep"
    shown = [(key, label) for key, label in RATES if any(key in r for r in rows)]
    st.caption("Colours span each map's own range (the values are written in the cells); "
               "rows: γmax, which needs training; columns: ξ, as trained or as re-thresholded.")
    columns = st.columns(min(3, len(shown)) or 1)
    for i, (key, label) in enumerate(shown):
        with columns[i % len(columns)]:
            st.plotly_chart(grid_heatmap(rows, x_field, y_field, key, label, own_range=True),
                            key=f"sw_heat_{key}")
    st.dataframe(report["rows"], hide_index=True)
    st.download_button("Sweep table CSV", csv_bytes(report["rows"]), f"{report['sweep']}.csv",
                       "text/csv", key="sw_dl")


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
