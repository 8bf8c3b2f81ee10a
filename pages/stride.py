"""Stride / time: what each stride plan costs on this machine (speed and memory) and what it
buys (accuracy), the paper's Table VII measured here. Both measurements run in the background."""

import time

import streamlit as st

from engine.bench import format_plans, parse_stride_plans, start_stride_bench, stride_summary
from engine.jobs import ACTIVE, Job, State
from engine.models import backbone_spec, list_backbones, list_heads
from engine.safe_io import read_json
from engine.sweep import (
    launch_sweep,
    list_sweeps,
    read_manifest,
    sweep_process_alive,
    sweep_runs,
)
from ui.figures import bench_figure, stride_sketch_figure, stride_time_figure
from ui.st_forms import config_of, queue_note, run_settings
from ui.st_guards import guard
from ui.st_links import ensure_router
from ui.st_models import device_badge, store
from ui.st_session import keep, remember, remembered
from ui.st_watch import look_at_queue

BENCH_KEY = "st_bench_folder"


def default_plans(backbone: str) -> str:
    return format_plans(backbone_spec(backbone).compare_plans)


def bench_section() -> None:
    st.subheader("Speed and memory")
    backbones = [b for b in list_backbones() if backbone_spec(b).compare_plans]
    c1, c2, c3, c4 = st.columns(4)
    backbone = c1.selectbox("Backbone", backbones, **keep("st_backbone", "small_cnn", backbones))
    heads = list_heads()
    head = c2.selectbox("Head", heads, **keep("st_head", "loss_attention", heads))
    size = c3.selectbox("Input size", [32, 64], **keep("st_size", 32, [32, 64]))
    batch = int(c4.number_input("Batch", 1, 1024, step=16, **keep("st_batch", 64)))
    plans = st.text_input("Stride plans (per-stage strides; ';' between plans)",
                          **keep(f"st_plans_{backbone}", default_plans(backbone)))
    with guard("The sketch of the plans", stop=False):
        grids = plan_grids(backbone, head, tuple(parse_stride_plans(plans)), size)
        st.plotly_chart(stride_sketch_figure(grids, (size, size)), key="st_sketch")
        st.caption("Grey: the cell of each patch on the input; red: the pixels the centre patch "
                   "sees. A larger stride early shrinks every map after it: fewer, coarser "
                   "patches, and a faster step.")
    if st.button("Measure on this machine", key="st_measure"):
        with guard("The benchmark", stop=False):
            parsed = parse_stride_plans(plans)
            folder = store().root / "_bench" / time.strftime("%Y%m%d-%H%M%S")
            start_stride_bench(folder, backbone, head, parsed, size, batch)
            remember(BENCH_KEY, str(folder))
    bench_results()


@st.cache_resource(max_entries=16, show_spinner=False)
def plan_grids(backbone: str, head: str, plans: tuple, size: int) -> list:
    """(label, patch grid) per plan, from the layer geometry of the built model."""
    from engine.config import ModelConfig
    from engine.models import build_model

    out = []
    for plan in plans:
        model = build_model(ModelConfig(backbone=backbone, head=head, stride_plan=list(plan),
                                        input_size=(size, size)))
        out.append((f"plan {','.join(map(str, plan))}", model.grid((size, size))))
    return out


@st.fragment(run_every=1.5)
def bench_results() -> None:
    from pathlib import Path

    folder = remembered(BENCH_KEY)
    if not folder:
        st.caption(f"Forward + backward images/s and peak memory per plan on {device_badge()}; "
                   "each plan is measured in a fresh process.")
        return
    folder = Path(folder)
    result = folder / "bench.json"
    status = Job(folder).status()
    if result.is_file():
        rows = [{"plan": r["stride_plan"], "images_per_s": r["images_per_s"],
                 "memory_mb": r["peak_mem_mb"], "step_ms": r["step_ms"], "params": r["params"],
                 "device": r["device"]} for r in read_json(result, "a benchmark result")]
        st.plotly_chart(bench_figure(rows), key="st_bench_fig")
        st.dataframe(rows, hide_index=True)
    elif status.state in ACTIVE:
        st.progress(0.5, text="Measuring in the background...")
    elif status.state == State.QUEUED:
        look_at_queue()
        st.progress(0.0, text=f"The benchmark is {queue_note(folder)}.")
    else:
        st.error("The benchmark ended without a result: "
                 + (status.reason or Job(folder).last_output_line() or "no output"))


def accuracy_section() -> None:
    st.subheader("Accuracy against time per epoch")
    st.caption("Trains one run per plan (a sweep over model.stride_plan, in the background), "
               "then plots its best test accuracy against its median seconds per epoch; on a "
               "GPU, marker size is the run's peak allocated memory.")
    with st.container(border=True):  # no st.form: its widgets could not remember values
        settings = run_settings("st_tr", heads=True)
        plans = st.text_input("Stride plans to train", **keep("st_tr_plans",
                                                               default_plans("small_cnn")))
        name = st.text_input("Sweep name", **keep("st_tr_name", "stride"))
        go = st.button("Train the plans", key="st_tr_launch")
    if go:
        with guard("Launching", stop=False):
            grid = [("model.stride_plan", [list(p) for p in parse_stride_plans(plans)])]
            launch_sweep(store(), config_of(settings), grid, name.strip())
            remember("st_sweep", name.strip())
    # Only sweeps over the stride plan: another sweep's cells all share one plan.
    sweeps = [s for s in list_sweeps(store())
              if "model.stride_plan" in (read_manifest(store(), s) or [])]
    if not sweeps:
        st.caption("No stride sweep yet: train the plans above.")
        return
    sweep = st.selectbox("Stride sweep", sweeps, **keep("st_sweep", sweeps[0], sweeps))
    stride_results(sweep)


@st.fragment(run_every=2.0)
def stride_results(sweep: str) -> None:
    """Refreshes on its own while the sweep trains."""
    rows = stride_summary(sweep_runs(store(), sweep))
    if sweep_process_alive(store(), sweep):
        st.info("Training in the background; the plot fills in as epochs finish.")
    if rows:
        st.plotly_chart(stride_time_figure(rows), key="st_time_fig")
        st.dataframe(rows, hide_index=True)
        if not any(r.get("memory_mb") for r in rows):
            st.caption("No memory figure for trained runs on a CPU: a run's peak memory is "
                       "mostly torch itself, the same for every plan. The benchmark above "
                       "measures each plan's own increase in a fresh process.")


ensure_router()
st.title("Stride / time")
with guard("Stride / time: speed", stop=False):
    bench_section()
with guard("Stride / time: accuracy", stop=False):
    accuracy_section()
