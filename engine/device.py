"""Device choice and the fast-by-default settings per device."""

from __future__ import annotations

import contextlib
import functools

import torch

from engine.config import DEVICE_CHOICES, is_device_name
from engine.errors import ConfigError


def resolve_device(name: str = "auto", field: str = "device") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu. An unknown or unavailable explicit device is
    an error naming ``field`` (:func:`check_device`)."""
    check_device(name, field)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def check_device(name: str, field: str = "train.device") -> None:
    """Refuse a device this machine does not have, with one line naming ``field``: the
    pre-flight of a run (before its folder is made) and of every ``--device``. A property of
    the machine, not of the config: a GPU run's config still loads on a CPU for viewing."""
    if not is_device_name(name):
        raise ConfigError(f"{field} must be one of {list(DEVICE_CHOICES)} or 'cuda:N'; "
                          f"got {name!r}")
    problem = device_problem(name)
    if problem:
        raise ConfigError(f"{field}: {problem}")


def device_problem(name: str) -> str | None:
    """Why the known device ``name`` cannot be used here (None: it can)."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            return (f"{name} is not available on this machine (no CUDA GPU visible); use cpu "
                    "or auto")
        count = torch.cuda.device_count()
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            return (f"{name} is not on this machine, whose {count} CUDA GPU(s) are {have}; use "
                    "one of them, cuda or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        return "mps is not available on this machine (no Apple MPS GPU); use cpu or auto"
    return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep the memory a CPU training step frees, for the next step to reuse.

    A step frees and allocates its activations every time, each one up to tens of MB. glibc
    gives such blocks back to the system when they are freed (mmap above a threshold, heap
    trimming above another), so the next step faulted them in again page by page: 17,000 to
    45,000 minor faults per fp32 small_cnn step, 15 to 20 % of its time, and more for two peers
    than for one (docs/performance.md, "Mutual transfer's cost"). With both thresholds raised,
    blocks of up to 1 GiB (32 MiB where an older glibc refuses more) come from the heap and
    stay there. The process then keeps its peak size, which the next step needs anyway; an
    explicit ``malloc_trim`` still hands it back. Process-wide and for the process's life
    (glibc cannot be set back to its moving thresholds). Returns whether it applied: False
    where there is no glibc (musl, macOS, Windows)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    kept = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    direct = mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(kept and direct)


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to ``count`` inside, and what they were restored after.
    The setting outlives the call (it is the calling thread's count and the default of threads
    started later), and a library call must not leave it changed for its caller, whose later
    floating-point sums (and so bit-for-bit comparisons of runs) depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX, from /proc/cpuinfo's flags).
    Without it oneDNN emulates bf16, which is far slower than fp32 (an exploratory timing on
    2 AVX2 cores: 25 against 279 training images/s for small_cnn)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no way to tell, so no bf16
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is fast on ``device``: CUDA, or a CPU with native bf16."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def channels_last_supported(device: torch.device) -> bool:
    """Whether training uses channels_last when asked (``train.channels_last``): CUDA and the
    CPU (oneDNN's convolutions are faster in it: ``python -m engine bench`` on a CPU compares
    both layouts); not MPS."""
    return device.type in ("cuda", "cpu")


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast when enabled and fast on ``device`` (:func:`amp_supported`); a no-op
    elsewhere."""
    if enabled and amp_supported(device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def ieee_fp32():
    """True fp32 inside: no TF32 in cuDNN convolutions (torch's default allows it) nor in
    CUDA matmuls. The new per-backend flags only: torch refuses a mix with the legacy
    ``allow_tf32`` ones."""
    flags = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    before = [f.fp32_precision for f in flags]
    for f in flags:
        f.fp32_precision = "ieee"
    try:
        yield
    finally:
        for f, value in zip(flags, before, strict=True):
            f.fp32_precision = value


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, else the process's peak RSS.

    Reported per epoch so that stride plans can be compared by memory as well as time."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
