"""Jobs sharing the CPU (issue 34), measured side by side in one run:
``python tests/bench_jobs.py [--out F]`` (also ``tests/bench_perf.py --only jobs,queue``).

- ``alone_s``: one default digits run (the README's command, in the foreground);
- ``in_a_row_s``: four of them, one after another;
- ``together_s[limit]``: four launched together with ``--background``, from the first launch to
  the last one finished, under the store's job limit (``$LOSSATTN_MAX_JOBS``): each limit in
  ``--limits``, the default (one per core) first;
- ``queue``: ``--launches`` short runs launched at once: the most that computed at the same time
  (slots held), the queue's longest, how long all took, and every run's end state.

With ``--before``, also four together the old way: no queue, every run at torch's default
threads (``LOSSATTN_THREADS`` = the cores), ended after ``--before-limit`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT = ["train", "--dataset", "digits", "--backbone", "small_cnn", "--head", "loss_attention",
           "--quiet"]
SHORT = ["--train-size", "2000", "--test-size", "300", "--epochs", "1"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOSSATTN_THREADS", "OMP_NUM_THREADS", "LOSSATTN_MAX_JOBS")}
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}


def engine(args: list[str], env: dict) -> None:
    subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def states(store: Path) -> dict[str, str]:
    out = {}
    for folder in store.iterdir():
        with_status = folder / "status.json"
        if folder.is_dir() and with_status.is_file():
            out[folder.name] = json.loads(with_status.read_text()).get("state")
    return out


def wait_all(store: Path, names: list[str], timeout: float, watch=None) -> bool:
    """Whether every run of ``names`` ended within ``timeout`` s; ``watch()`` is called at
    each look (every 0.2 s)."""
    from engine.runs import Run

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        ended = [Run(store / n).status().state in ("finished", "failed", "stopped")
                 for n in names]
        if watch is not None:
            watch()
        if all(ended):
            return True
        time.sleep(0.2)
    return False


def alone_and_in_a_row(count: int = 4) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        env = _env()
        times = []
        for i in range(count):
            start = time.monotonic()
            engine([*DEFAULT, "--runs-dir", folder, "--name", f"row-{i}"], env)
            times.append(time.monotonic() - start)
        return {"alone_s": times[0], "in_a_row_s": sum(times), "each_s": times}


def together(limit: int | None, count: int = 4, threads: int | None = None,
             timeout: float = 900.0) -> dict:
    """``count`` default runs launched with ``--background`` at once; seconds to the last one
    finished. ``limit``: the store's job limit (None: no queue, ``count``); ``threads``:
    pinned (the old behaviour: every run at the cores)."""
    extra = {"LOSSATTN_MAX_JOBS": str(limit or count)}
    if threads:
        extra["LOSSATTN_THREADS"] = str(threads)
    env = _env(**extra)
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        names = [f"bg-{i}" for i in range(count)]
        start = time.monotonic()
        launches = [subprocess.Popen([sys.executable, "-m", "engine", *DEFAULT, "--background",
                                      "--runs-dir", folder, "--name", n], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for n in names]
        for proc in launches:
            proc.wait()
        done = wait_all(store, names, timeout)
        seconds = time.monotonic() - start
        if not done:
            from engine.runs import RunStore

            for n in names:
                RunStore(store).stop(n)
            wait_all(store, names, 120)
        return {"seconds": seconds, "finished": done, "states": states(store)}


def queue_of(launches: int, folder: str | Path | None = None, sample=None) -> dict:
    """``launches`` short runs started at once in the background under the default limit, into
    the store ``folder`` (a temporary one by default); ``sample()`` is called at every look
    (e.g. to read the app server's memory)."""
    with (tempfile.TemporaryDirectory() if folder is None else _kept(folder)) as store:
        return _queue_in(launches, Path(store), sample)


@contextlib.contextmanager
def _kept(folder):
    yield folder


def _queue_in(launches: int, store: Path, sample) -> dict:
    from engine.slots import Slots

    env = _env()
    folder = str(store)
    names = [f"q-{i:02d}" for i in range(launches)]
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "engine", *DEFAULT, *SHORT,
                               "--background", "--runs-dir", folder, "--name", n],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for n in names]
    for proc in procs:
        proc.wait()
    peak = {"held": 0, "queued": 0}

    def watch() -> None:
        slots = Slots(store)
        peak["held"] = max(peak["held"], slots.held())
        peak["queued"] = max(peak["queued"], len(slots.queued()))
        if sample is not None:
            sample()

    done = wait_all(store, names, 1800, watch)
    ends = states(store)
    return {"launches": launches, "seconds": time.monotonic() - start, "all_ended": done,
            "most_computing_at_once": peak["held"], "longest_queue": peak["queued"],
            "end_states": {s: list(ends.values()).count(s) for s in set(ends.values())}}


def measure(limits: list[int], launches: int, before: bool, before_limit: float) -> dict:
    from engine.slots import cores, default_limit

    result = {"cores": cores(), "default_limit": default_limit(),
              "load_avg_1min": os.getloadavg()[0], **alone_and_in_a_row()}
    result["together_s"] = {str(limit): together(limit) for limit in limits}
    if before:
        result["before_no_queue_default_threads"] = together(
            None, threads=cores(), timeout=before_limit)
    default = result["together_s"][str(limits[0])]["seconds"]
    result["together_over_in_a_row"] = default / result["in_a_row_s"]
    result["together_over_alone"] = default / result["alone_s"]
    if launches:
        result["queue"] = queue_of(launches)
    result["load_avg_1min_end"] = os.getloadavg()[0]
    return result


def main() -> int:
    from engine.slots import default_limit

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limits", default=None,
                        help="comma-separated job limits for four runs together (default: the "
                             "default limit, then 1 and 4)")
    parser.add_argument("--launches", type=int, default=20, help="runs launched at once")
    parser.add_argument("--before", action="store_true",
                        help="also four together without queue, at torch's default threads")
    parser.add_argument("--before-limit", type=float, default=300.0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    limits = ([int(v) for v in args.limits.split(",")] if args.limits
              else list(dict.fromkeys([default_limit(), 1, 4])))
    result = measure(limits, args.launches, args.before, args.before_limit)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
