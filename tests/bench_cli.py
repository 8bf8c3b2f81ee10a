"""What the command line's first use costs (issue 31), measured as a newcomer meets it.

(a) ``python -m engine --help`` against ``python -c pass``: CPU time (user + sys, from
    ``getrusage(RUSAGE_CHILDREN)`` deltas) of each, interleaved run by run so that both see the
    same machine load; medians. Target: the help within 3x the bare interpreter.
(b) A newcomer's first run, ``python -m engine train --name first`` and nothing else: wall time
    and final test accuracy, in a fresh run store and (unless ``--warm-cache``) a fresh data
    cache, so the digits are generated as on a first use. Targets: >= 97 %, <= 60 s on a quiet
    2-core machine.

    python tests/bench_cli.py                  # both, 21 help runs each
    python tests/bench_cli.py --help-runs 41 --skip-train
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELP_RATIO = 3.0
TRAIN_S, TRAIN_ACC = 60.0, 0.97


def cpu_seconds(argv: list[str], env: dict) -> float:
    """CPU time (user + sys) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_help(runs: int) -> dict:
    env = dict(os.environ)
    bare, helped = [], []
    for _ in range(runs):  # side by side: a load spike hits both
        bare.append(cpu_seconds([sys.executable, "-c", "pass"], env))
        helped.append(cpu_seconds([sys.executable, "-m", "engine", "--help"], env))
    pass_s, help_s = statistics.median(bare), statistics.median(helped)
    return {"runs": runs, "python_c_pass_cpu_s": pass_s, "engine_help_cpu_s": help_s,
            "ratio": help_s / pass_s, "target_ratio": HELP_RATIO,
            "ok": help_s <= HELP_RATIO * pass_s}


def bench_first_train(warm_cache: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        env = {**os.environ, "LOSSATTN_RUNS": str(Path(tmp) / "runs")}
        if not warm_cache:
            env["LOSSATTN_CACHE"] = str(Path(tmp) / "cache")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "engine", "train", "--name", "first",
                               "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True,
                              check=False)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"train failed ({proc.returncode}): {proc.stderr[-2000:]}")
        run = Path(tmp) / "runs" / "first"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((run / "config.json").read_text())
    acc = rows[-1]["test_acc"]
    return {"wall_s": wall, "test_acc": acc, "epochs": len(rows),
            "model": f"{config['model']['backbone']}/{config['model']['head']}",
            "preset": config["preset"], "cold_cache": not warm_cache,
            "first_lines": proc.stderr.splitlines()[:3],
            "ok": acc >= TRAIN_ACC and wall <= TRAIN_S}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--help-runs", type=int, default=21, help="runs of each (default 21)")
    parser.add_argument("--skip-help", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use the usual data cache (default: a fresh one, as a first use)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    out = {"cpus": os.cpu_count()}
    if not args.skip_help:
        h = out["help"] = bench_help(args.help_runs)
        print(f"python -c pass        {h['python_c_pass_cpu_s'] * 1000:6.1f} ms CPU (median of "
              f"{h['runs']})")
        print(f"python -m engine --help {h['engine_help_cpu_s'] * 1000:6.1f} ms CPU: "
              f"{h['ratio']:.2f}x (target <= {HELP_RATIO:g}x) {'ok' if h['ok'] else 'MISSED'}")
    if not args.skip_train:
        t = out["train"] = bench_first_train(args.warm_cache)
        print(f"train --name first    {t['wall_s']:6.1f} s wall, test accuracy "
              f"{t['test_acc']:.4f} ({t['model']}, preset {t['preset']}, {t['epochs']} "
              f"epochs, {'cold' if t['cold_cache'] else 'warm'} data cache; target >= "
              f"{TRAIN_ACC:.0%} in <= {TRAIN_S:g} s) {'ok' if t['ok'] else 'MISSED'}")
        for line in t["first_lines"]:
            print(f"  | {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if all(part["ok"] for part in out.values() if isinstance(part, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
