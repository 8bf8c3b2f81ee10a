"""Benchmark: what the MIL protocol options cost. One data set and method cross-validated (the
full 5 x 10 folds) under the default protocol, without the test-max record, and with the epochs
chosen by inner CV, side by side in one process with the same thread count. Not a test (pytest
does not collect it); run it on a quiet machine:

    LOSSATTN_DATA=../shared/data python tests/bench_mil.py [--dataset musk1] [--method ...]
        [--threads 1] [--repeats 2]

It prints one row per variant (min / median / max seconds over the repeats, the ratio of the
medians to the default's, and the accuracies) and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from engine.mil.config import MilConfig
from engine.mil.data import load_mil_dataset
from engine.mil.protocol import cross_validate

VARIANTS = {
    "default (validation, test-max recorded)": {},
    "no test-max record": {"report_test_max": False},
    "inner CV (3 folds)": {"epoch_choice": "inner_cv"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="musk1")
    parser.add_argument("--method", default="loss_attention")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mil_dataset(args.dataset, os.environ.get("LOSSATTN_DATA"))
    results = {}
    for label, changes in VARIANTS.items():
        seconds, row = [], None
        for _ in range(args.repeats):
            started = time.perf_counter()
            row = cross_validate(data, MilConfig(method=args.method, **changes))
            seconds.append(time.perf_counter() - started)
        results[label] = {"seconds": seconds, "accuracy": row["accuracy_mean"],
                          "test_max": row.get("test_max_mean")}
    base = statistics.median(results[next(iter(VARIANTS))]["seconds"])
    print(f"{args.dataset} / {args.method}, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.2f} at the end")
    print("| variant | s min / median / max | vs default | accuracy | test-max |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        s = r["seconds"]
        test_max = "-" if r["test_max"] is None else f"{r['test_max']:.3f}"
        print(f"| {label} | {min(s):.1f} / {statistics.median(s):.1f} / {max(s):.1f} | "
              f"{statistics.median(s) / base:.2f}x | {r['accuracy']:.3f} | {test_max} |")
    print(json.dumps({"dataset": args.dataset, "method": args.method, "threads": args.threads,
                      "results": results}))


if __name__ == "__main__":
    main()
