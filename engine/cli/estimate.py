"""How long a run will train on this device, said before it starts when that is long.

A newcomer's first run must not look hung: the paper's ResNet18 trains at about 1.6 images/s on
a 2-core CPU, so its first step alone takes over a minute. Before training, ``train`` times the
run here and, past :data:`LONG_S`, says the estimate and the flags of a fast run.

The estimate comes from the run store's finished runs of the same model and data where there
are some (:func:`engine.sweep.cell_seconds`, what the Sweep page shows), else from timing
training steps of the run's model on random input of its size: one step of a batch of
:data:`FIRST_BATCH` images (a ResNet18 on a CPU: about 2 s), then two of the largest batch, up to
the run's own (at most :data:`CPU_BATCH` on a CPU), that this first rate says take about
:data:`PROBE_S` each.
"""

from __future__ import annotations

from dataclasses import dataclass

LONG_S = 600.0
"""A run estimated past 10 minutes says so before it starts."""
FAST_FLAGS = "--backbone small_cnn --preset live"
"""A run that trains in about a minute on a CPU (the digits' default; issue 31)."""
FIRST_BATCH = 2
CPU_BATCH = 32
"""Images/s on a CPU is flat from 32 to 128 (the live preset's reason for batch 32)."""
PROBE_S = 1.0
"""About how long the second timed step may take."""


@dataclass(frozen=True)
class Estimate:
    seconds: float
    basis: str
    """What the figure rests on, for the note."""
    at_least: bool = False
    """The training split's size was not known: the test split's stood in for it."""


def duration_text(seconds: float) -> str:
    """``8 h 32 min``, ``12 min``, ``45 s``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes >= 48 * 60:
        return f"{minutes / 1440:.0f} days"
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def long_run_note(estimate: Estimate | None, device: str, fast: bool = False) -> str | None:
    """The lines a long run starts with (None for a run within :data:`LONG_S`). ``fast``: the
    run already is the fast one, so the machine, not the settings, is slow."""
    if estimate is None or estimate.seconds <= LONG_S:
        return None
    about = "at least" if estimate.at_least else "about"
    advice = ("note: these are already the fast settings: the machine is busy or slow" if fast
              else f"note: for a fast run (about a minute on a CPU) use: {FAST_FLAGS}")
    return (f"note: this run will take {about} {duration_text(estimate.seconds)} on this "
            f"{device} ({estimate.basis}).\n{advice}")


def is_fast(cfg) -> bool:
    """Whether the run is what :data:`FAST_FLAGS` make: the small CNN on the live preset."""
    return cfg.model.backbone == "small_cnn" and cfg.preset == "live"


def train_images(cfg) -> tuple[int, bool]:
    """(training images per epoch, whether that is only a lower bound): the config's count, a
    generated set's own, else the test split's (every paper data set's training split is
    larger)."""
    from engine.data import dataset_spec, load_split

    if cfg.data.train_size:
        return cfg.data.train_size, False
    spec = dataset_spec(cfg.data.dataset)
    count = spec.generated(cfg.data, "train").get("count") if spec.generated else None
    if count:
        return int(count), False
    return len(load_split(cfg.data, "test")), True


def measured_rate(model_cfg, device, batch: int, steps: int = 1) -> float:
    """Training images/s of ``model_cfg`` here: the median of ``steps`` timed forward+backward
    passes of ``batch`` random images, after one untimed (the training default's layout and
    precision)."""
    from engine.bench import bench_one, modes_for

    return bench_one(model_cfg, modes_for(device, False, False)[0], device, batch, steps,
                     1).images_per_s


def estimate(cfg, store, measure=None) -> Estimate:
    """The training time of the prepared RunConfig ``cfg`` on its device; ``measure(model
    config, device, batch, steps)`` gives images/s (default: :func:`measured_rate`)."""
    from engine.device import resolve_device
    from engine.sweep import cell_seconds

    seconds, basis = cell_seconds(store, cfg)
    if seconds is not None:
        return Estimate(seconds, basis)
    measure = measure or measured_rate
    images, at_least = train_images(cfg)
    work = cfg.train.epochs * images * len(cfg.models)  # peers train on every image too
    device = resolve_device(cfg.train.device, "train.device")
    rate = measure(cfg.model, device, FIRST_BATCH, 1)
    # Then the largest batch, up to the run's own (a CPU's images/s is flat past CPU_BATCH),
    # that the first rate says takes PROBE_S: a busy moment or a tiny batch's overhead in the
    # first step does not decide alone, and a slow model costs seconds, not minutes.
    cap = min(cfg.train.batch_size, CPU_BATCH) if device.type == "cpu" else cfg.train.batch_size
    batch = max(FIRST_BATCH, min(cap, int(rate * PROBE_S)))
    rate = measure(cfg.model, device, batch, 2)
    models = f" x {len(cfg.models)} models" if len(cfg.models) > 1 else ""
    return Estimate(work / rate, f"{cfg.train.epochs} epoch(s) x {images:,} images{models} at "
                                 f"{rate:,.1f} images/s, {cfg.model.backbone} timed here on a "
                                 f"batch of {batch}", at_least)


def say_if_long(cfg, store, say) -> None:
    """Call ``say`` with the note of a long run (nothing for a short one). The estimate is
    advice: where it cannot be made, training goes on and says why, if it fails, itself."""
    try:
        found = estimate(cfg, store)
    except (RuntimeError, ValueError, OSError) as exc:  # CUDA out of memory is a RuntimeError
        say(f"note: no time estimate ({' '.join(str(exc).split())[:160]})")
        return
    from engine.device import resolve_device

    note = long_run_note(found, resolve_device(cfg.train.device, "train.device").type,
                         is_fast(cfg))
    if note:
        say(note)
