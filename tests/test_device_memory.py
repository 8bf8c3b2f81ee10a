"""keep_freed_memory: a CPU training step's freed activations stay with the process for the
next step, instead of being handed back to the system and faulted in again page by page."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Minor page faults of allocating, filling and freeing a 64 MiB tensor 5 times: before and
# after keep_freed_memory, in a fresh process (the setting is process-wide and for good).
_FAULTS = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from engine.device import keep_freed_memory

def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 << 20).add_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

faults()
before = faults()
applied = keep_freed_memory()
faults()
print(before, faults(), applied)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_activations_are_kept_for_the_next_step():
    out = subprocess.run([sys.executable, "-c", _FAULTS, str(ROOT)], capture_output=True,
                         text=True, check=True).stdout.split()
    before, after, applied = int(out[0]), int(out[1]), out[2]
    if applied != "True":
        pytest.skip("no glibc here (musl?): nothing to set")
    # 5 x 64 MiB is 81,920 pages of 4 KiB (fewer with transparent huge pages): each one was
    # faulted in again before; after, the heap keeps them.
    assert before > 0 and after * 20 < before, (before, after)


def test_the_trainer_keeps_freed_memory_on_a_cpu(monkeypatch, tmp_path):
    """train's set-up asks for it where the device is the CPU (as the step benchmark does)."""
    import engine.train
    from engine.config import RunConfig
    from engine.runs import RunStore

    calls = []
    monkeypatch.setattr(engine.train, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = engine.train.prepare_run_config(RunConfig(
        name="kept", model={"backbone": "small_cnn"},
        data={"dataset": "digits", "train_size": 64, "test_size": 32},
        train={"epochs": 1, "batch_size": 32, "device": "cpu"}))
    run = RunStore(tmp_path).create(cfg)
    assert engine.train.train_run(run, progress_bar=False) == "finished"
    assert calls == [1]
