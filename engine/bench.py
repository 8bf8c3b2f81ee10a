"""Forward + backward throughput and peak memory of models on the current device.

``python -m engine bench`` prints one row per (model, mode). On CUDA the default mode is bf16
autocast + channels_last (the training default); ``--compare-fp32`` adds plain fp32 eager and
``--compile`` adds ``torch.compile`` in the same run, so ratios come from one process. On CPU the
default mode is fp32 channels_last (the training default there), and ``--compare-fp32`` adds
fp32 eager in the contiguous layout.

Each row runs in a fresh process (``isolate=True``), so that no row inherits another's freed
heap, compile caches or warmed kernels. Memory: on CUDA, ``torch.cuda.max_memory_allocated``; on
CPU, the peak resident set size above the level just before the model was built, sampled every
2 ms from /proc (CPU allocations are invisible to torch's counters). Each row is the median step
time over ``steps`` timed steps after ``warmup`` untimed ones.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Self

import torch

from engine.config import LossConfig, ModelConfig
from engine.device import autocast, ieee_fp32
from engine.losses import Criterion
from engine.models import build_model, compiled, count_parameters


@dataclass
class BenchMode:
    name: str
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    ieee_fp32: bool = False
    """No TF32 in fp32 convolutions and matmuls (:func:`engine.device.ieee_fp32`)."""


@dataclass
class BenchResult:
    model: str
    mode: str
    device: str
    batch: int
    input_size: tuple[int, int]
    params: int
    images_per_s: float
    step_ms: float
    peak_mem_mb: float
    memory_kind: str
    stride_plan: str = "default"
    """The backbone's per-stage strides, e.g. "1,2,1" ("default": the backbone's own)."""


def modes_for(device: torch.device, compare_fp32: bool, compile_: bool) -> list[BenchMode]:
    if device.type == "cuda":
        modes = [BenchMode("bf16+channels_last", amp=True, channels_last=True)]
        if compile_:
            modes.append(BenchMode("bf16+channels_last+compile", True, True, True))
        if compare_fp32:
            modes.append(BenchMode("fp32 eager"))
        return modes
    modes = [BenchMode("fp32 channels_last", channels_last=True)]  # the CPU training default
    if compare_fp32:
        modes.append(BenchMode("fp32 eager"))
    if compile_:
        modes.append(BenchMode("fp32 compile", compile=True))
    return modes


class _RssSampler:
    """Peak resident set size of this process while active (Linux /proc; else ru_maxrss)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self.page
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(cfg: ModelConfig, mode: BenchMode, device: torch.device, batch: int,
              steps: int, warmup: int) -> BenchResult:
    with ieee_fp32() if mode.ieee_fp32 else contextlib.nullcontext():
        return _bench_one(cfg, mode, device, batch, steps, warmup)


def _bench_one(cfg: ModelConfig, mode: BenchMode, device: torch.device, batch: int,
               steps: int, warmup: int) -> BenchResult:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with _RssSampler() as rss:
        model, loss_of, x = step_parts(cfg, batch, device)
        memory_format = torch.channels_last if mode.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        run = compiled(model) if mode.compile else model
        x = x.contiguous(memory_format=memory_format)
        times = []
        for i in range(warmup + steps):
            _sync(device)
            start = time.perf_counter()
            with autocast(device, mode.amp):
                out = run(x)
            loss = loss_of(out)
            loss.backward()
            model.zero_grad(set_to_none=True)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda max allocated"
    else:
        peak, kind = rss.peak - rss.base, "process RSS increase"
    step = statistics.median(times)
    plan = ",".join(map(str, cfg.stride_plan)) if cfg.stride_plan else "default"
    name = f"{cfg.backbone}/{cfg.head}" + (f" stride {plan}" if cfg.stride_plan else "")
    result = BenchResult(name, mode.name, str(device), batch, cfg.input_size,
                         count_parameters(model), batch / step, step * 1000, peak / 2**20, kind,
                         plan)
    del model, run, out, loss
    return result


def step_parts(cfg: ModelConfig, batch: int, device: torch.device):
    """What one benchmark step trains: the model (train mode, on ``device``), its loss as a
    function of the model's output, and a seeded batch of inputs."""
    model = build_model(cfg).to(device).train()
    criterion = Criterion(LossConfig(), model.regularised)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_chans, *cfg.input_size, generator=gen).to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(device)
    return model, (lambda out: criterion(out, y, 100).total), x


def bench_isolated(cfg: ModelConfig, mode: BenchMode, device: torch.device, batch: int,
                   steps: int, warmup: int) -> BenchResult:
    """:func:`bench_one` in a fresh spawned process (see the module docstring for why), with
    this process's torch threads (a background benchmark's share of the cores)."""
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context,
                             initializer=torch.set_num_threads,
                             initargs=(torch.get_num_threads(),)) as pool:
        return pool.submit(bench_one, cfg, mode, device, batch, steps, warmup).result()


def format_table(results: list[BenchResult]) -> str:
    header = ("model", "mode", "device", "batch", "input", "params (M)", "img/s", "step ms",
              "peak MB")
    rows = [header] + [
        (r.model, r.mode, r.device, str(r.batch), f"{r.input_size[0]}x{r.input_size[1]}",
         f"{r.params / 1e6:.2f}", f"{r.images_per_s:.1f}", f"{r.step_ms:.0f}",
         f"{r.peak_mem_mb:.0f}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if results:
        lines.append(f"(peak MB = {results[0].memory_kind}; median of timed steps)")
    return "\n".join(lines)


def results_as_dicts(results: list[BenchResult]) -> list[dict]:
    return [asdict(r) for r in results]


@contextlib.contextmanager
def _no_gc():
    """Python's cyclic collector off while timing, as ``timeit`` does: in a process holding
    many objects one collection can outlast a sub-millisecond step many times over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _timed_images_per_s(steps: int, batch: int, step_fn, device: torch.device) -> float:
    step_fn()  # warm-up
    _sync(device)
    with _no_gc():
        start = time.perf_counter()
        for _ in range(steps):
            step_fn()
        _sync(device)
        seconds = time.perf_counter() - start
    return steps * batch / seconds


def bench_training(data_cfg, model_cfg: ModelConfig, device: torch.device, batch: int,
                   steps: int) -> dict:
    """Training throughput split into its parts, measured side by side in one process:
    the batch pipeline alone (index, augment, normalise), the model alone (forward, backward,
    optimizer step on a fixed batch), and both together (a real training step)."""
    from engine.data import augment_of, load_split
    from engine.data.base import BatchStream

    data = load_split(data_cfg, "train")
    size = data.input_size
    cfg = model_cfg.replace(num_classes=data.num_classes, in_chans=data.images.shape[1],
                            input_size=size)
    model = build_model(cfg).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = Criterion(LossConfig(multilabel=data.multilabel), model.regularised)
    images = data.images.to(device) if device.type == "cuda" else None
    targets = data.targets.to(device) if device.type == "cuda" else None
    augment = augment_of(data_cfg)

    def batches():
        epoch = 0
        while True:
            yield from BatchStream(data, batch, device, augment=augment, shuffle=True, epoch=epoch,
                                   images=images, targets=targets)
            epoch += 1

    loader = batches()
    x_fixed, y_fixed, _ = next(loader)

    def model_step(x=None, y=None):
        x, y = (x_fixed, y_fixed) if x is None else (x, y)
        criterion(model(x), y, 100).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def loader_step():
        x, _, _ = next(loader)
        if device.type == "cuda":
            x.sum().item()  # force the work to happen

    def full_step():
        x, y, _ = next(loader)
        model_step(x, y)

    return {
        "dataset": data_cfg.dataset, "model": f"{cfg.backbone}/{cfg.head}", "device": str(device),
        "batch": batch, "input": f"{size[0]}x{size[1]}", "augment": str(augment),
        "loader_images_per_s": _timed_images_per_s(steps, batch, loader_step, device),
        "model_images_per_s": _timed_images_per_s(steps, batch, model_step, device),
        "train_step_images_per_s": _timed_images_per_s(steps, batch, full_step, device),
    }


def parse_stride_plans(text: str) -> list[tuple[int, ...]]:
    """``"1,2,1; 2,2,1"`` (or one plan per line) -> [(1, 2, 1), (2, 2, 1)]."""
    plans = []
    for part in text.replace("\n", ";").split(";"):
        if not part.strip():
            continue
        try:
            plan = tuple(int(v) for v in part.replace(" ", "").split(",") if v)
        except ValueError:
            raise ValueError(f"a stride plan is comma-separated integers; got {part.strip()!r}"
                             ) from None
        if not plan or min(plan) < 1:
            raise ValueError(f"a stride plan needs positive integers; got {part.strip()!r}")
        plans.append(plan)
    if not plans:
        raise ValueError("give at least one stride plan, e.g. 1,2,1")
    return plans


def format_plans(plans) -> str:
    """The text :func:`parse_stride_plans` reads: ``"1,2,1; 2,2,1"``."""
    return "; ".join(",".join(map(str, plan)) for plan in plans)


def start_stride_bench(folder, backbone: str, head: str, plans: list[tuple[int, ...]],
                       input_size: int, batch: int, steps: int = 3):
    """Measure each stride plan in a background job (a :class:`~engine.job_spec.BenchSpec`,
    what ``python -m engine bench`` measures) whose results land in ``folder/bench.json``;
    returns the job."""
    from pathlib import Path

    from engine.job_spec import BenchSpec
    from engine.jobs import Job

    folder = Path(folder)
    job = Job(folder)
    spec = BenchSpec(models=[(backbone, head)], stride_plans=[tuple(p) for p in plans],
                     input_size=input_size, batch=batch, steps=steps, device="auto",
                     json=str((folder / "bench.json").resolve()))
    job.spawn(spec, kind="bench")
    return job


def bench_models(models: list[tuple[str, str]], plans: list[tuple[int, ...] | None],
                 device: torch.device, *, batch: int, steps: int, warmup: int, num_classes: int,
                 input_size: int, compare_fp32: bool = False, compile_: bool = False,
                 isolate: bool = True, echo=print) -> list[BenchResult]:
    """Every (backbone, head) at every stride plan (None: the backbone's own) in every mode
    of ``device`` (what ``python -m engine bench`` measures); ``echo`` hears each row."""
    configs = [ModelConfig(backbone=b, head=h, num_classes=num_classes, input_size=input_size,
                           stride_plan=plan) for b, h in models for plan in plans]
    run = bench_isolated if isolate else bench_one
    results = []
    for cfg in configs:
        for mode in modes_for(device, compare_fp32, compile_):
            result = run(cfg, mode, device, batch, steps, warmup)
            results.append(result)
            echo(f"  measured {result.model} [{result.mode}]: {result.images_per_s:.1f} img/s")
    return results


def stride_summary(runs) -> list[dict]:
    """Per run of a stride sweep: its plan, best test accuracy (or mAP, as the trainer recorded
    it), median seconds per epoch and, on CUDA, its peak allocated memory (Table VII, measured
    here). On a CPU no memory figure: a run's peak RSS is mostly torch itself and the same for
    every plan (the benchmark measures each plan's own increase in a fresh process)."""
    rows = []
    for run in runs:
        metrics = run.metrics()
        if not metrics:
            continue
        plan = run.config_dict().get("model", {}).get("stride_plan")
        status = run.status()
        memory = [m["peak_memory_mb"] for m in metrics if m.get("peak_memory_mb") is not None]
        on_gpu = str(status.fields.get("device", "")).startswith("cuda")
        rows.append({"run": run.name, "plan": ",".join(map(str, plan)) if plan else "default",
                     "accuracy": status.fields.get("best_metric"),
                     "epoch_s": statistics.median(m.get("epoch_s", 0.0) for m in metrics),
                     "memory_mb": max(memory) if memory and on_gpu else None,
                     "epochs": len(metrics), "state": status.state.value})
    return rows


def bench_evaluation(model, data, device: torch.device, xi_grid: list[float]) -> dict:
    """Seconds for patch metrics over ``data`` at every ξ of ``xi_grid`` (issue #4's budget).

    One pass of the backbone caches the per-patch logits and norms; each ξ then re-decodes that
    cache. The backbone's forward calls are counted, so the figure shows the grid did not re-run
    it. Patch precision-recall curves are left out: they are one extra pass over the cache, not a
    per-ξ cost."""
    from engine.evaluate import evaluate_model

    batches = []
    hook = model.backbone.register_forward_hook(lambda m, i, o: batches.append(len(i[0])))
    try:
        report = evaluate_model(model, data, device, xi_grid=xi_grid, groups=["image", "patch"],
                                pr_curves=False)
    finally:
        hook.remove()
    timing = report["timing"]
    per_xi = timing["metrics_s_per_xi"]
    return {"images": len(data), "xi_values": len(per_xi),
            "backbone_images": sum(batches), "backbone_calls": len(batches),
            "backbone_pass_s": timing["collect_s"], "metrics_all_xi_s": sum(per_xi),
            "metrics_per_xi_s": statistics.median(per_xi),
            "total_s": timing["collect_s"] + sum(per_xi), "threads": torch.get_num_threads()}
