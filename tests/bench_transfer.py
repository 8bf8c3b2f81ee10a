"""Benchmark: what mutual transfer costs. Time per training epoch of one peer alone (an ordinary
run), of two peers trained together at λ = 0 (the control: maps measured, not learned from) and
at λ > 0 (activation maps; patch-weight maps), measured side by side in one process on the same
data. Not a test (pytest does not collect it); run it on a quiet machine:

    python tests/bench_transfer.py [--epochs 3] [--train-size 4000] [--backbone small_cnn]
    python tests/bench_transfer.py --backbone timm:resnet18 --output-stride 8 --train-size 1024

It prints a table and a JSON line; the ratios are the median epoch time over one peer's.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--output-stride", type=int, help="timm backbones: output_stride")
    args = parser.parse_args()
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
