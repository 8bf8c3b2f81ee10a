"""Device choice and the fast-by-default settings per device."""

from __future__ import annotations

import contextlib
import functools

import torch

from engine.config import DEVICE_CHOICES


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu. An unavailable explicit device is an error."""
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of {list(DEVICE_CHOICES)} or 'cuda:N'; got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available here")
    return torch.device(name)


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
