"""Benchmark: what mutual transfer costs. Time per training epoch of one peer alone (an ordinary
run), of two peers trained together at λ = 0 (the control: maps measured, not learned from) and
at λ > 0 (activation maps; patch-weight maps), measured side by side in one process on the same
data. Not a test (pytest does not collect it); run it on a quiet machine:

    python tests/bench_transfer.py [--epochs 3] [--train-size 4000] [--backbone small_cnn]
    python tests/bench_transfer.py --backbone timm:resnet18 --output-stride 8 --train-size 1024

It prints a table and a JSON line; the ratios are the median epoch time over one peer's.

``--step`` measures the training step alone (forward, losses, backward, optimizer step on one
fixed batch, no data loading), in fp32 and, where the device has native bf16, under bf16
autocast: what ``make perf`` reports as the cost of mutual transfer (:func:`step_ratios`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError, RunConfig
from engine.runs import RunStore
from engine.train import prepare_run_config, train_run


def config(args, name: str, transfer: dict | None) -> RunConfig:
    peer = {"backbone": args.backbone, "head": "loss_attention",
            "timm_output_stride": args.output_stride}
    return RunConfig(name=name, model=peer,
                     data={"dataset": args.dataset, "train_size": args.train_size,
                           "test_size": 256},
                     train={"epochs": args.epochs, "batch_size": args.batch, "device": "cpu"},
                     transfer=None if transfer is None else {"peers": [peer], **transfer})


STEP_CASES = {"one peer": None, "two peers, λ = 0": {"lam": 0.0},
              "two peers, activation maps": {"lam": 1.0}}


def _team_class():
    try:
        from engine.team import Team
    except ImportError:  # a checkout from before the team moved into the trainer (--tree)
        from engine.mutual.team import Team
    return Team


def _step_timer(transfer: dict | None, amp: bool, backbone: str, batch: int):
    """A function that runs one training step of a fresh team and returns its seconds."""
    import time

    import torch

    from engine import device

    # What training does on a CPU (an older checkout, with this script copied in, lacks it).
    getattr(device, "keep_freed_memory", lambda: None)()
    peer = {"backbone": backbone, "head": "loss_attention"}
    cfg = prepare_run_config(RunConfig(
        name="step", model=peer, data={"dataset": "digits"},
        train={"device": "cpu", "amp": amp, "batch_size": batch},
        transfer=None if transfer is None else {"peers": [peer], **transfer}))
    torch.manual_seed(0)
    team = _team_class()(cfg, torch.device("cpu"))
    team.train()
    x = torch.randn(batch, cfg.model.in_chans, *cfg.model.input_size)
    y = torch.randint(0, cfg.model.num_classes, (batch,))

    def step() -> float:
        start = time.perf_counter()
        outs, maps = team.forward(x, amp)
        terms = team.losses(outs, maps, y, 1.0)
        sum(t["loss"] for t in terms).backward()
        team.optimizer_step()
        return time.perf_counter() - start
    return step


def step_ratios(amp: bool, steps: int = 1, rounds: int = 40, backbone: str = "small_cnn",
                batch: int = 128) -> dict:
    """Median step seconds of each case of STEP_CASES and its ratio to one peer. The cases
    take turns, ``steps`` at a time for ``rounds`` rounds (after two warm-up steps each), so
    that a change in the machine's load falls on all of them alike: one step at a time, since
    10 at a time let a ratio move by 0.3 between two runs on a 2-core machine."""
    timers = {label: _step_timer(t, amp, backbone, batch) for label, t in STEP_CASES.items()}
    times: dict[str, list[float]] = {label: [] for label in timers}
    for timer in timers.values():
        timer(), timer()
    for _ in range(rounds):
        for label, timer in timers.items():
            times[label] += [timer() for _ in range(steps)]
    median = {label: statistics.median(v) for label, v in times.items()}
    one = median["one peer"]
    return {"amp": amp, "backbone": backbone, "batch": batch, "step_s": median,
            "ratio": {label: v / one for label, v in median.items()}}


def print_steps(args) -> None:
    from engine.device import cpu_has_native_bf16

    results = [step_ratios(False, backbone=args.backbone, batch=args.batch)]
    if cpu_has_native_bf16():
        results.append(step_ratios(True, backbone=args.backbone, batch=args.batch))
    for r in results:
        print(f"{'bf16 autocast' if r['amp'] else 'fp32'}, {r['backbone']}, batch {r['batch']}")
        for label, seconds in r["step_s"].items():
            print(f"  {label:30s} {seconds * 1000:8.1f} ms {r['ratio'][label]:6.2f}x")
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--output-stride", type=int, help="timm backbones: output_stride")
    parser.add_argument("--step", action="store_true",
                        help="time the training step alone, fp32 and bf16 (see above)")
    args = parser.parse_args()
    if args.step:
        print_steps(args)
        return
    cases = {"one peer alone": None,
             "two peers, λ = 0 (control)": {"lam": 0.0},
             "two peers, λ = 1, activation maps": {"lam": 1.0},
             "two peers, λ = 1, patch-weight maps": {"lam": 1.0, "map_source": "patch_weights"}}
    results = {}
    with tempfile.TemporaryDirectory() as root:
        store = RunStore(root)
        for i, (label, transfer) in enumerate(cases.items()):
            try:
                prepared = prepare_run_config(config(args, f"case{i}", transfer))
            except ConfigError as exc:  # e.g. a patch grid smaller than the region grid
                print(f"{label}: skipped ({exc})", file=sys.stderr)
                continue
            run = store.create(prepared)
            assert train_run(run, progress_bar=False) == "finished", run.status()
            results[label] = statistics.median(r["epoch_s"] for r in run.metrics())
    one = results["one peer alone"]
    print(f"{'case':40s} {'epoch s':>8s} {'x one peer':>10s}")
    for label, seconds in results.items():
        print(f"{label:40s} {seconds:8.2f} {seconds / one:10.2f}")
    print(json.dumps({"args": vars(args), "epoch_s": results,
                      "ratio": {k: v / one for k, v in results.items()}}))


if __name__ == "__main__":
    main()
