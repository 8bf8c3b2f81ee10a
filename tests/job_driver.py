"""Run ``python -m engine`` with a fault placed where a test needs it (not collected by pytest).

    python tests/job_driver.py MODE ARGS...

Modes:
- ``slow-data``: loading the data writes ``<run dir>/LOADING`` and then takes 60 s, so a test can
  stop the trainer during its start-up;
- ``pause-in-save:N``: the N-th rename of a checkpoint onto ``last.pt`` writes ``<run dir>/SAVING``
  and waits 60 s first, with the new checkpoint complete in its temp file, so a test can kill
  the process in the middle of a checkpoint write.

The run directory is the value of ``--run-dir``.
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run_dir(args: list[str]) -> Path:
    return Path(args[args.index("--run-dir") + 1])


def slow_data(run_dir: Path) -> None:
    from engine import train

    real = train.load_split

    def load_split(*args, **kwargs):
        (run_dir / "LOADING").touch()
        time.sleep(60)
        return real(*args, **kwargs)

    train.load_split = load_split


def pause_in_save(run_dir: Path, nth: int) -> None:
    import os

    from engine import fsutil

    real, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "last.pt":
            seen[0] += 1
            if seen[0] == nth:
                (run_dir / "SAVING").touch()
                time.sleep(60)
        return real(src, dst, *args, **kwargs)

    fsutil.os = type(sys)("os_with_a_slow_replace")
    fsutil.os.__dict__.update({k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fsutil.os.replace = replace


def main() -> int:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "slow-data":
        slow_data(_run_dir(args))
    elif mode.startswith("pause-in-save:"):
        pause_in_save(_run_dir(args), int(mode.split(":")[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    from engine.cli import main as engine_main

    return engine_main(args)


if __name__ == "__main__":
    sys.exit(main())
