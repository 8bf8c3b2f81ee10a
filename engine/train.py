"""The training loop: one run directory in, checkpoints and metrics out.

Read top to bottom: resolve the config -> load data -> build model and optimizer -> (resume) ->
epochs of steps -> evaluate -> metrics line -> checkpoints.

Guarantees:
- Stop (SIGTERM, SIGINT or a ``STOP`` file): the current step finishes, a checkpoint is written,
  the run is marked ``stopped``. ``resume`` continues the same curves: the same epoch and step,
  optimizer state, RNG state and ramp-up weight. Batches and augmentation are functions of
  ``(seed, epoch, step)``, so the resumed run sees the batches the uninterrupted one would have.
- A kill (SIGKILL, power loss) loses at most the work since the last checkpoint (every epoch,
  and every ``checkpoint_minutes`` within one). Checkpoints are written atomically.
- A non-finite loss marks the run ``failed`` with the reason; checkpoints are left untouched.
- Every run trains a team (:class:`engine.team.Team`): an ordinary run is a team of one,
  with exactly the single-model step; a mutual-transfer run (``RunConfig.transfer``) trains its
  K peers in the same loop, which steps, checkpoints and evaluates all of them. A metrics row
  keeps the team's means under the plain names and each peer's own in ``row["peers"]``
  (K > 1; read any version's with :func:`engine.team.peer_rows`).
- Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP (nccl on CUDA, gloo on
  CPU). Each rank takes a contiguous slice of every global batch, and BatchNorm statistics are
  per rank, as with the paper's DataParallel. A run with W ranks therefore equals a
  single-process run with ``micro_batches = W``. Only rank 0 writes to the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Self

import torch

from engine.budget import ThreadBudget, holding
from engine.checkpoint import atomic_torch_save, check_classes, load_checkpoint
from engine.config import ConfigError, ModelConfig, RunConfig
from engine.data import augment_of, describe, load_split
from engine.data.base import BatchStream, ImageSet, model_input
from engine.data.registry import CACHE_VERSION as DATA_VERSION
from engine.device import (
    amp_supported,
    channels_last_supported,
    check_device,
    keep_freed_memory,
    peak_memory_mb,
    resolve_device,
)
from engine.folder_guard import FolderGuard, RunFolderRemoved
from engine.fsutil import remove_temp_files
from engine.jobs import ACTIVE, JobStopped, ProcessIdentity, State, queue_place
from engine.losses import scaled_ramp_epochs
from engine.metric_table import main_metric
from engine.metrics import evaluate
from engine.models import build_model, compiled, head_spec, resolve_config
from engine.recipes import RECIPES
from engine.runs import Run, RunError
from engine.slots import store_root_of
from engine.team import Team, map_agreement, map_plan, peer_checkpoint

log = logging.getLogger("engine.train")

# ----------------------------------------------------------------------------------------------
# Config resolution


def prepare_run_config(cfg: RunConfig, *, machine: bool = True) -> RunConfig:
    """Fill in what follows from the data and the backbone, so config.json says exactly what ran.

    The model's classes, channels and input size come from the data set (for every peer of a
    mutual-transfer run, whose maps are checked against its grid); the loss becomes multi-label
    for multi-label data; the ramp-up keeps the paper's 80/200 proportion of the run; the
    recipe's learning rate and weight decay are written out.

    Every run is made from this config, so it is also the run's pre-flight: ``machine`` (the
    default) refuses a device this machine lacks (:func:`check_machine`) before a run folder
    exists; False for a run that trains elsewhere (a Ray cell).
    """
    if machine:
        check_machine(cfg)
    info = describe(cfg.data)
    size = info["input_size"]
    for where, m in zip(_model_fields(cfg), cfg.models, strict=True):
        check_num_classes(m, info["num_classes"], cfg.data.dataset, where)
    models = [resolve_config(m.replace(num_classes=info["num_classes"], in_chans=info["in_chans"],
                                       input_size=(size, size))) for m in cfg.models]
    with torch.device("meta"):  # geometry check (no patch fits, ...) without allocating
        built = [build_model(m) for m in models]
        if cfg.transfer is not None:
            map_plan(built, cfg.transfer)
    model = models[0]
    transfer = (None if cfg.transfer is None
                else dataclasses.replace(cfg.transfer, peers=tuple(models[1:])))
    if cfg.transfer is not None and cfg.transfer.kl and info["multilabel"]:
        raise ConfigError("transfer.kl must be 0 for multi-label data: mutual learning's KL term "
                          "compares softmax class distributions")
    loss = cfg.loss
    ramp = scaled_ramp_epochs(cfg.train.epochs) if loss.ramp_epochs is None else loss.ramp_epochs
    loss = dataclasses.replace(loss, multilabel=info["multilabel"], ramp_epochs=ramp)
    recipe = head_spec(model.head).recipe if cfg.train.recipe == "auto" else cfg.train.recipe
    defaults = RECIPES[recipe]
    train = type(cfg.train)(**{
        **asdict(cfg.train), "recipe": recipe,
        "lr": cfg.train.lr if cfg.train.lr is not None else defaults.lr,
        "weight_decay": (cfg.train.weight_decay if cfg.train.weight_decay is not None
                         else defaults.weight_decay)})
    data = type(cfg.data)(**{**asdict(cfg.data), "input_size": size})
    return RunConfig(name=cfg.name, model=model, data=data, loss=loss, train=train,
                     tags=cfg.tags, notes=cfg.notes, transfer=transfer, preset=cfg.preset)


def check_machine(cfg: RunConfig) -> None:
    """What a run needs of this machine, checked before anything is made for it: its device."""
    check_device(cfg.train.device, "train.device")


def _model_fields(cfg: RunConfig) -> list[str]:
    """How the run's models are named in messages: ``model``, ``transfer.peers[0]``, ..."""
    return ["model", *(f"transfer.peers[{i}]" for i in range(len(cfg.models) - 1))]


DATA_CLASSES = ModelConfig.num_classes
"""``model.num_classes`` at its default stands for "the data's count" (see ModelConfig)."""


def check_num_classes(model: ModelConfig, count: int, dataset: str, where: str = "model"
                      ) -> None:
    """Refuse a ``num_classes`` that the user set and that disagrees with the data's count;
    the default takes the data's."""
    if model.num_classes not in (count, DATA_CLASSES):
        raise ConfigError(f"{where}.num_classes is {model.num_classes} but data set {dataset} "
                          f"has {count} classes; set it to {count} or leave it out (the data's "
                          "count is taken)")


# ----------------------------------------------------------------------------------------------
# Processes: distributed set-up and signals


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class StopSignal:
    """SIGTERM / SIGINT set a flag that the loop reads at the end of each step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> Self:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a test harness)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------
# Progress and checkpoints


@dataclass
class Progress:
    epoch: int = 0
    """Epoch being trained (0-based)."""
    step: int = 0
    """Next step within that epoch."""
    best_metric: float | None = None
    best_epoch: int | None = None
    best_whole: bool = True
    """Whether the best metric was measured on the whole test set (``train.eval_sample``)."""
    sums: dict = field(default_factory=dict)
    """Running sums of the current epoch's training statistics: the team's under the plain
    names, each peer's in a list under ``peers`` (K > 1; see :func:`_epoch_sums`)."""
    epoch_seconds: float = 0.0
    """Training seconds already spent in the current epoch (before a stop)."""
    total_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


class _WithoutTraceback(logging.Formatter):
    """The console's format when the run has a log file: a record's message alone, its
    traceback (shared by every handler through the record) only in the run's log."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None,
                                        "stack_info": None})
        return super().format(record)


LOG_FORMAT, LOG_TIME = "%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"


def _setup_logging(run: Run, dist: Dist, console: bool) -> list[logging.Handler]:
    handlers: list[logging.Handler] = []
    if dist.is_main:
        handlers.append(logging.FileHandler(run.log_path))
    if console:
        handlers.append(_TqdmHandler())
    for h in handlers:
        brief = dist.is_main and isinstance(h, _TqdmHandler)  # rank 0 has the log file
        h.setFormatter((_WithoutTraceback if brief else logging.Formatter)(LOG_FORMAT, LOG_TIME))
        for name in ("engine", "py.warnings"):
            logging.getLogger(name).addHandler(h)
    logging.getLogger("engine").setLevel(logging.INFO)
    return handlers


def _teardown_logging(handlers: list[logging.Handler]) -> None:
    for h in handlers:
        for name in ("engine", "py.warnings"):
            logging.getLogger(name).removeHandler(h)
        h.close()


class NonFiniteLoss(RuntimeError):
    pass


class StatusWriter:
    """``set_status(**fields)``: the run's status, written by rank 0 only and indexed
    (``hook``); every write into the run folder is guarded by :attr:`guard`."""

    def __init__(self, run: Run, dist: Dist, hook: Callable[[Run], object]) -> None:
        self.run, self.dist, self.hook = run, dist, hook
        self.guard = FolderGuard(run.path)

    def __call__(self, **fields) -> None:
        if self.dist.is_main:
            with self.guard.writing():
                self.run.update_status(**fields)
            self.hook(self.run)

    def writing(self):
        """Guard a write of rank 0 (checkpoints, metrics) into the run folder."""
        return self.guard.writing() if self.dist.is_main else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# The loop


def train_run(run: Run, *, resume: bool = False, progress_bar: bool = True,
              console: bool | None = None, dist: Dist | None = None, on_status=None,
              spawned: bool = False) -> State:
    """Train (or resume) ``run`` to its end or until stopped. Returns the final state.

    ``console``: also log to stderr (default: with the progress bar); the run's log.txt gets
    everything regardless. ``on_status(run)`` is called after each status write (the CLI passes
    the run store's index update). ``spawned``: this process was started for this run by
    :func:`engine.launch.start`, which did the checks and marked it as starting.

    The run is this process's job from the first line (:meth:`engine.jobs.Job.attach`): SIGTERM
    during start-up ends it as ``stopped``, and any error ends it as ``failed`` with the reason;
    it is never left saying ``running`` without a process.
    """
    dist = dist or Dist()
    handlers = _setup_logging(run, dist, console=progress_bar if console is None else console)
    set_status = StatusWriter(run, dist, on_status or (lambda r: None))
    try:
        if dist.is_main:  # refusals (finished, running, ...) leave the run exactly as it was
            check_startable(run, resume, spawned)
        # Under torchrun, SIGTERM keeps its default (rank 0 ends at once and torchrun takes the
        # other ranks down), rather than ending rank 0 cleanly while the others wait for it.
        job = (run.job.attach(sigterm=dist.world == 1) if dist.is_main
               else contextlib.nullcontext())
        with job:
            return _train_guarded(run, resume, progress_bar, dist, set_status)
    finally:
        set_status.guard.close()
        _teardown_logging(handlers)


def _train_guarded(run: Run, resume: bool, progress_bar: bool, dist: Dist,
                   set_status: StatusWriter) -> State:
    """:func:`_train`, with every way it can end written to the run's status (a removed run
    folder excepted: nothing is written into it again)."""
    try:
        set_status(reason="")  # attach marked the run running; this also updates the index
        if dist.is_main:
            freed = remove_temp_files(run.path)
            if freed:
                log.info("removed %.1f MB of temp files left by an interrupted write", freed / 1e6)
        return _train(run, run.config(), resume, progress_bar, dist, set_status)
    except JobStopped as exc:  # SIGTERM outside the step loop, where StopSignal is not listening
        return _ended_by(exc, run, dist, set_status)
    except Exception as exc:  # noqa: BLE001 - any error must end as failed, never as running
        return _ended_by(exc, run, dist, set_status)


def _ended_by(exc: BaseException, run: Run, dist: Dist, set_status: StatusWriter) -> State:
    """Log how ``exc`` ended the run, write it to the status and return the final state."""
    if dist.is_main and not set_status.guard.intact():  # whatever the error, this is its cause
        log.error("%s", _removed_text(exc, set_status.guard))
        return State.FAILED
    state, reason = _ending(exc, run, dist)
    try:
        set_status(state=state, reason=reason)
    except RunFolderRemoved as removed:
        log.error("%s", removed)
        return State.FAILED
    return state


def _removed_text(exc: BaseException, guard: FolderGuard) -> str:
    if isinstance(exc, RunFolderRemoved):
        return str(exc)
    with contextlib.suppress(RunFolderRemoved):
        guard.check()  # the error came from the removal: take back what it recreated
    return f"run folder removed: {guard.path} was removed while its trainer ran ({exc})"


def _ending(exc: BaseException, run: Run, dist: Dist) -> tuple[State, str]:
    """(state, reason) after ``exc``, logged: a traceback only for the unforeseen, and then
    into the run's log, with one line on the console that says where it is."""
    if isinstance(exc, JobStopped):
        log.info("stopped during start-up")
        if dist.is_main:  # first: whoever sees "stopped" sees the request handled
            run.job.clear_stop()
        return State.STOPPED, ("stopped during start-up, outside a training step; resume "
                               "continues from the last checkpoint")
    if isinstance(exc, NonFiniteLoss):
        log.error("%s", exc)
        return State.FAILED, str(exc)
    if isinstance(exc, ValueError | OSError):  # expected (as for the CLI): the message says it
        log.error("%s", _one_line(exc))
        return State.FAILED, _failure_reason(exc, dist)
    if not dist.is_main:  # no log file on this rank: the traceback goes where it can
        log.exception("training failed")
        return State.FAILED, _failure_reason(exc, dist)
    where = f"the traceback is in {run.log_path}"
    log.error("unexpected %s: %s; %s", exc.__class__.__name__, _one_line(exc), where,
              exc_info=exc)
    return State.FAILED, f"{_failure_reason(exc, dist)} (unexpected; {where})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or exc.__class__.__name__


def _failure_reason(exc: Exception, dist: Dist) -> str:
    """The status's reason for an error; a broken process group says what that means."""
    text = f"{exc.__class__.__name__}: {exc}"
    if dist.world > 1 and _is_group_error(exc):
        return (f"lost contact with the other ranks of the {dist.world}-process group (a node "
                f"died or its network failed); resume continues from the last checkpoint. {text}")
    return text


def _is_group_error(exc: Exception) -> bool:
    import torch.distributed as tdist

    # gloo reports a peer's death as a plain RuntimeError that names its transport
    return isinstance(exc, tdist.DistError) or any(
        word in str(exc) for word in ("gloo", "NCCL", "Connection reset by peer"))


def check_startable(run: Run, resume: bool, spawned: bool = False) -> None:
    """Refuse to start a run that is running, finished (resume) or already started (train).

    ``spawned``: this process was started for this run by :func:`engine.launch.start`, which did
    the check and marked the run as starting."""
    raw = run.raw_status()
    recorded = run.job.process(raw)
    mine = recorded is None or recorded.matches(ProcessIdentity.current())
    if spawned and raw.state in ACTIVE and mine:  # running: this process's own attach
        return
    status = run.status()
    state = status.state
    if state in ACTIVE:
        raise RunError(f"run {run.name} is already running"
                       + (f" (pid {recorded.pid})" if recorded else ""))
    if state == State.QUEUED:
        place = queue_place(run.path)
        raise RunError(f"run {run.name} is already queued"
                       + (f" (place {place[0]} of {place[1]})" if place else "")
                       + ": it starts when one of the store's slots frees (stop it to take it "
                       "out of the queue)")
    if resume:
        if state == State.FINISHED:
            raise RunError(f"run {run.name} is finished ({status.fields.get('epochs_done')} "
                           "epochs); nothing to resume. Start a new run to train longer.")
        if state == State.CREATED:
            raise RunError(f"run {run.name} has not started yet; train it instead of resuming")
    elif state != State.CREATED:
        raise RunError(f"run {run.name} is {state}; use resume to continue it")


@dataclass
class Session:
    """Everything one training process set up for a run: what the stages below share."""

    run: Run
    cfg: RunConfig
    dist: Dist
    device: torch.device
    team: Team
    """The model (or the mutual-transfer peers), optimizers and objective."""
    train_set: ImageSet
    test_set: ImageSet
    progress: Progress
    set_status: StatusWriter
    images: torch.Tensor | None = None
    """The training images and targets kept on the device (None: moved per batch)."""
    targets: torch.Tensor | None = None
    test_images: torch.Tensor | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.team.model

    @property
    def amp(self) -> bool:
        return self.cfg.train.amp and amp_supported(self.device)

    @property
    def channels_last(self) -> bool:
        return self.cfg.train.channels_last and channels_last_supported(self.device)

    def save_last(self) -> None:
        if self.dist.is_main:
            ckpt = self.team.checkpoint(
                optimizers=True, progress=self.progress.as_dict(), rng=_rng_state(self.device),
                classes=self.train_set.classes, data_version=DATA_VERSION)
            with self.set_status.writing():
                atomic_torch_save(ckpt, self.run.last_checkpoint)


def _train(run: Run, cfg: RunConfig, resume: bool, progress_bar: bool, dist: Dist,
           set_status) -> State:
    """Set up, then epochs of steps, each epoch ending with its evaluation and checkpoints."""
    # The run holds one of its store's slots while it computes; its threads are its share of
    # the cores (or train.threads), followed once a second as other jobs start and end.
    with holding(store_root_of(run.path), run.path, cfg.train.threads) as budget:
        s = _set_up(run, cfg, resume, dist, set_status)
        set_status(threads_from=budget.source)
        reporter = Reporter(set_status, cfg.train,
                            math.ceil(len(s.train_set) / cfg.train.batch_size), budget)
        with StopSignal() as stop, contextlib.closing(s.team):
            for epoch in range(s.progress.epoch, cfg.train.epochs):
                ended = _train_epoch(s, epoch, stop, reporter, progress_bar)
                if ended is None:
                    return State.STOPPED
                _end_epoch(s, epoch, *ended, reporter.epoch_threads())
            # Inside: a SIGTERM now only sets the flag, so a trained-out run says finished.
            set_status(state=State.FINISHED, reason="", duration_s=s.progress.total_seconds,
                       eta_s=0.0)
    return State.FINISHED


def _set_up(run: Run, cfg: RunConfig, resume: bool, dist: Dist, set_status) -> Session:
    """Device, data, model, optimizer; the checkpoint to resume from; DDP and compile."""
    tc = cfg.train
    device = resolve_device(tc.device, "train.device")
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    torch.manual_seed(tc.seed)
    train_set, test_set = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    if train_set.num_classes != cfg.model.num_classes:
        raise ConfigError(f"the data set has {train_set.num_classes} classes but the run's model "
                          f"has num_classes={cfg.model.num_classes}")
    set_status(skipped_train=len(train_set.skipped), skipped_test=len(test_set.skipped),
               dropped_train=train_set.dropped, dropped_test=test_set.dropped)
    s = Session(run, cfg, dist, device, Team(cfg, device), train_set, test_set, Progress(),
                set_status)
    if resume:
        _resume_from_checkpoint(s)
    if dist.is_main:
        with set_status.writing():
            run.keep_metrics_before(s.progress.epoch)
    _wrap_for_speed(s)
    if device.type == "cuda":  # a sweep trains its cells in one process: each its own peak
        torch.cuda.reset_peak_memory_stats(device)
    n_params = s.team.parameter_count()
    log.info("run %s: %s (%.2fM params) on %s, %s: %d train / %d test images, %d epochs",
             run.name, " + ".join(f"{m.backbone}/{m.head}" for m in cfg.models), n_params / 1e6,
             device, cfg.data.dataset, len(train_set), len(test_set), tc.epochs)
    set_status(epochs=tc.epochs, epochs_done=s.progress.epoch,
               metric_name=main_metric(cfg.loss.multilabel), device=str(device),
               params=n_params, world=dist.world, train_images=len(train_set),
               test_images=len(test_set), cpu_threads=torch.get_num_threads())
    return s


def _resume_from_checkpoint(s: Session) -> None:
    """Model, optimizer, progress and RNG from last.pt (a run without one starts over)."""
    path = s.run.last_checkpoint
    if not path.is_file():
        log.info("no checkpoint yet: %s restarts from the beginning", s.run.name)
        return
    ckpt = load_checkpoint(path)
    check_classes(ckpt.get("classes"), s.train_set.classes, str(path),
                  hint="The run's data changed since this checkpoint: restore it, or start a "
                       "new run on the new data.")
    if ckpt.get("data_version") != DATA_VERSION:
        log.warning("%s was written when images were decoded differently (data pipeline %s, "
                    "now %s): the resumed run goes on, but is not bit for bit the run an "
                    "uninterrupted one would have been", path, ckpt.get("data_version", 1),
                    DATA_VERSION)
        s.set_status(warning="resumed across a change of the image decoding; not bit-exact")
    s.team.load(ckpt, path)
    s.progress = Progress(**ckpt["progress"])
    _restore_rng(ckpt["rng"], s.device)
    log.info("resumed %s at epoch %d step %d", s.run.name, s.progress.epoch, s.progress.step)


def _wrap_for_speed(s: Session) -> None:
    """DDP across ranks, torch.compile, and the data on the GPU when it fits."""
    tc, cuda = s.cfg.train, s.device.type == "cuda"
    for peer in s.team.peers:
        if s.dist.world > 1:
            # 1x1-conv gradients have equivalent but differently written strides; nothing to fix.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
            peer.net = torch.nn.parallel.DistributedDataParallel(
                peer.model, device_ids=[s.device.index] if cuda else None)
        if tc.compile:
            peer.net = compiled(peer.model, peer.net)
    keep = tc.data_on_device
    if keep is None:
        keep = cuda and s.train_set.images.numel() < 0.25 * torch.cuda.mem_get_info(s.device)[0]
    s.set_status(data_on_device=bool(keep))  # GPU-side batches and augmentation, or not
    if keep:
        s.images = s.train_set.images.to(s.device)
        s.targets = s.train_set.targets.to(s.device)
        s.test_images = s.test_set.images.to(s.device)


class Reporter:
    """The run's live status: step, images/s and the ETA, written at most once a second; at
    the same pace the thread budget is looked at again (:mod:`engine.slots`)."""

    def __init__(self, set_status, tc, steps_per_epoch: int, budget: ThreadBudget) -> None:
        self.set_status, self.tc, self.steps = set_status, tc, steps_per_epoch
        self.budget = budget
        self.last = 0.0
        self.threads_seen = {budget.threads}

    def start_epoch(self, start_step: int, seconds_before: float) -> None:
        """``seconds_before``: time this epoch already took before a resume."""
        self.start_step, self.seconds_before = start_step, seconds_before
        self.started = time.monotonic() - seconds_before

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, epoch: int, step: int) -> None:
        now = time.monotonic()
        if now - self.last <= 1.0:
            return
        self.last = now
        rate = (step - self.start_step) * self.tc.batch_size / max(
            self.elapsed() - self.seconds_before, 1e-9)
        remaining = (self.steps - step + (self.tc.epochs - epoch - 1) * self.steps)
        threads = self.budget.follow()
        if threads is not None:
            log.info("torch threads now %d: %d job(s) compute under this run store", threads,
                     self.budget.slots_seen)
            self.threads_seen.add(threads)
        self.set_status(epoch=epoch, step=step, steps=self.steps, images_per_s=rate,
                        eta_s=remaining * self.tc.batch_size / max(rate, 1e-9),
                        cpu_threads=self.budget.threads)

    def epoch_threads(self) -> list[int]:
        """The thread counts used since the last call (for the epoch's metrics row)."""
        seen, self.threads_seen = sorted(self.threads_seen), {self.budget.threads}
        return seen


def _train_epoch(s: Session, epoch: int, stop: StopSignal, reporter: Reporter,
                 progress_bar: bool) -> tuple[dict, float, float, float] | None:
    """The epoch's steps from ``progress.step`` on. Returns (loss sums, lr, patch weight,
    seconds), or None when a stop request ended the run (a checkpoint was written)."""
    from tqdm import tqdm

    tc, progress = s.cfg.train, s.progress
    stream = BatchStream(s.train_set, tc.batch_size, s.device, augment=augment_of(s.cfg.data),
                         shuffle=True, seed=tc.seed, epoch=epoch, start_step=progress.step,
                         rank=s.dist.rank, world=s.dist.world, images=s.images,
                         targets=s.targets)
    # The epoch row reports the lr and patch weight where the epoch (re)starts; schedules then
    # move per step (engine.recipes), at the position set before each step below.
    start = epoch + progress.step / len(stream)
    lr, patch_weight = s.team.set_position(start), s.team.patch_weight(start)
    s.team.train()
    sums = _epoch_sums(progress.sums, s.device)
    bar = tqdm(total=len(stream), initial=progress.step, desc=f"epoch {epoch + 1}/{tc.epochs}",
               disable=not (progress_bar and s.dist.is_main), leave=False, dynamic_ncols=True)
    reporter.start_epoch(progress.step, progress.epoch_seconds)
    last_checkpoint = time.monotonic()
    for x, y, _ in stream:
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = epoch + progress.step / len(stream)
        s.team.set_position(t)
        terms = _step(s, x, y, t)
        team = _team_terms(terms)
        bad, wants_stop = _agree_flags(team["loss"], stop.requested or (
            s.dist.is_main and s.run.stop_requested()), s.device, s.dist)
        if bad:
            raise NonFiniteLoss(f"loss became non-finite at epoch {epoch} step {progress.step} "
                                f"(lr {lr:g}); checkpoints are untouched. Try a lower lr or fp32.")
        s.team.optimizer_step()
        _accumulate(sums, team, terms, y, s.cfg.loss.multilabel)
        progress.step += 1
        bar.update(1)
        reporter.step(epoch, progress.step)
        periodic = (time.monotonic() - last_checkpoint > 60 * tc.checkpoint_minutes
                    and progress.step < len(stream))  # the epoch's end saves anyway
        if wants_stop or periodic:
            progress.sums = _saved_sums(sums)
            progress.epoch_seconds = reporter.elapsed()
            s.save_last()
            last_checkpoint = time.monotonic()
            if wants_stop:
                bar.close()
                _stopped(s, epoch)
                return None
    bar.close()
    return sums, lr, patch_weight, reporter.elapsed()


_OLD_PEER_SUM = re.compile(r"([a-z_]+?)(\d+)")


def _epoch_sums(saved: dict, device: torch.device) -> dict:
    """Running sums of the epoch's training statistics (restored mid-epoch after a resume):
    the team's (``loss``, ``image``, ``patch``, ``transfer``, ``kl``: the peers' mean; a single
    model's own, with ``correct``) and ``seen``; a team of K > 1 keeps each peer's (``loss``,
    ..., ``correct``) in a list under ``peers``.

    The previous version saved a mutual run's per-peer sums as suffixed keys beside the team's
    (``loss0``, ``correct1``, ...): they are read into ``peers``."""
    if not saved:
        return {k: torch.zeros((), device=device)
                for k in ("loss", "image", "patch", "correct", "seen")}
    sums: dict = {}
    peers: dict[int, dict] = {}
    for key, value in saved.items():
        if key == "peers":
            peers.update({k: {n: torch.tensor(v, device=device) for n, v in own.items()}
                          for k, own in enumerate(value)})
        elif match := _OLD_PEER_SUM.fullmatch(key):  # the previous version's form
            peers.setdefault(int(match[2]), {})[match[1]] = torch.tensor(value, device=device)
        else:
            sums[key] = torch.tensor(value, device=device)
    if peers:
        sums["peers"] = [peers[k] for k in range(len(peers))]
    return sums


def _saved_sums(sums: dict) -> dict:
    """The running sums as plain numbers (for ``Progress.sums`` in a checkpoint)."""
    return {k: ([{n: t.item() for n, t in own.items()} for own in v] if k == "peers"
                else v.item()) for k, v in sums.items()}


def _stopped(s: Session, epoch: int) -> None:
    s.progress.total_seconds += s.progress.epoch_seconds
    log.info("stopped at epoch %d step %d; checkpoint saved", epoch, s.progress.step)
    if s.dist.is_main:  # first: whoever sees "stopped" sees the request handled
        s.run.job.clear_stop()
    s.set_status(state=State.STOPPED, reason="stopped on request",
                 duration_s=s.progress.total_seconds)


def _end_epoch(s: Session, epoch: int, sums: dict, lr: float, patch_weight: float,
               seconds: float, threads: list[int]) -> None:
    """Evaluate, append the metrics line, write last.pt (and best.pt when it improved)."""
    cfg, progress, metric_name = s.cfg, s.progress, main_metric(s.cfg.loss.multilabel)
    _reduce_sums(sums, s.dist)
    row = _epoch_row(epoch, sums, lr, patch_weight, seconds, cfg.loss.multilabel)
    row["peak_memory_mb"] = peak_memory_mb(s.device)
    row["cpu_threads"] = threads  # every count the epoch trained with (the budget moves)
    if s.dist.is_main:
        tested = _evaluate_team(s, _eval_count(s, epoch))
        peers_tested = tested.pop("peers", None)
        row.update(tested)
        if peers_tested is not None:
            row["peers"] = [{**own, **test} for own, test in zip(row["peers"], peers_tested,
                                                                   strict=True)]
    _barrier(s.dist)
    progress.total_seconds += seconds
    progress.epoch, progress.step, progress.sums = epoch + 1, 0, {}
    progress.epoch_seconds = 0.0
    if not s.dist.is_main:
        return
    value, whole = row.get(metric_name), row["eval_images"] == len(s.test_set)
    improved = value is not None and not math.isnan(value) and _beats_best(progress, value,
                                                                           whole)
    if improved:
        progress.best_metric, progress.best_epoch, progress.best_whole = value, epoch, whole
    row["time"] = time.time()
    with s.set_status.writing():
        s.run.append_metrics(row)
    s.save_last()
    if improved:
        _save_best(s, row)
    log.info("epoch %d/%d  loss %.4f  %s %.4f  (best %.4f @ %d)  %.1fs  %.0f img/s",
             epoch + 1, cfg.train.epochs, row["train_loss"], metric_name,
             row.get(metric_name, float("nan")), progress.best_metric or float("nan"),
             (progress.best_epoch or 0) + 1, seconds, row["images_per_s"])
    # A team of K > 1: each peer's own last metric too (its best is the team's best epoch's).
    peers = ({"peers": [{"last_metric": _finite_or_none(own.get(metric_name))}
                        for own in row["peers"]]} if "peers" in row else {})
    s.set_status(epochs_done=epoch + 1, best_metric=progress.best_metric,
                 best_epoch=progress.best_epoch, last_metric=row.get(metric_name),
                 duration_s=progress.total_seconds, step=0, **peers)


def _finite_or_none(value):
    """A status value JSON can hold: NaN and inf (a metric can be NaN) become None."""
    return value if isinstance(value, int | float) and math.isfinite(value) else None


AGREEMENT_IMAGES = 256
"""Test images on which a mutual run measures how much its peers' local maps agree."""


def _eval_count(s: Session, epoch: int) -> int:
    """How many test images epoch ``epoch`` is evaluated on (``train.eval_sample``)."""
    sample = s.cfg.train.eval_sample
    last = epoch == s.cfg.train.epochs - 1
    return len(s.test_set) if sample is None or last else min(sample, len(s.test_set))


def _beats_best(progress: Progress, value: float, whole: bool) -> bool:
    """Whether a metric replaces the best: a whole-test-set evaluation always replaces a
    sample's (the two are not comparable, and the whole set is the honest one), a sample's
    never replaces a whole set's; otherwise the higher value wins."""
    if progress.best_metric is None:
        return True
    if whole != progress.best_whole:
        return whole
    return value > progress.best_metric


def _evaluate_team(s: Session, count: int) -> dict:
    """The model's test metrics on the first ``count`` test images (``eval_images``); for a
    team of K > 1 each peer's in a list under ``peers``, their mean under the plain names (the
    run's main metric is the peers' mean), and the peers' mean local-map Pearson ρ on the
    first test images (``test_map_pearson``)."""
    test_set, images = s.test_set, s.test_images
    if count < len(test_set):
        test_set = test_set.subset(torch.arange(count))
        images = None if images is None else images[:count]
    rows = [{**evaluate(m, test_set, s.device, amp=s.amp, images=images), "eval_images": count}
            for m in s.team.models]
    if not s.team.mutual:
        return rows[0]
    out = {key: sum(r[key] for r in rows) / len(rows)
           for key in set.intersection(*(set(r) for r in rows))}
    out["peers"] = rows
    first = s.test_set.images[:AGREEMENT_IMAGES]
    out["test_map_pearson"] = map_agreement(s.team, model_input(s.test_set, first, s.device))
    return out


def _save_best(s: Session, row: dict) -> None:
    """best.pt; a mutual run also writes each peer as a standalone checkpoint ``peer{k}.pt``
    (what the Explorer, Compare maps and ``export`` open)."""
    ckpt = s.team.checkpoint(progress=s.progress.as_dict(), metrics=row,
                             classes=s.train_set.classes)
    with s.set_status.writing():
        atomic_torch_save(ckpt, s.run.best_checkpoint)
    if s.team.mutual:
        for k in range(len(s.team.peers)):
            with s.set_status.writing():
                atomic_torch_save(peer_checkpoint(s.cfg, ckpt, k), s.run.peer_checkpoint(k))


def _step(s: Session, x: torch.Tensor, y: torch.Tensor, t: float
          ) -> list[dict[str, torch.Tensor]]:
    """Forward + backward of one global batch (split into micro-batches) at position ``t``
    (epochs); returns each peer's loss sums over the batch (``loss``, ``image``, ``patch``
    and, where they apply, ``transfer`` and ``kl``) and its ``logits``."""
    chunks = torch.tensor_split(torch.arange(x.shape[0], device=x.device),
                                s.cfg.train.micro_batches)
    chunks = [c for c in chunks if len(c)]
    team = s.team
    totals: list[dict[str, torch.Tensor]] = [{} for _ in team.peers]
    logits: list[list[torch.Tensor]] = [[] for _ in team.peers]
    for i, chunk in enumerate(chunks):
        with team.no_sync(i == len(chunks) - 1 or s.dist.world == 1):
            outs, maps = team.forward(x[chunk], s.amp)
            terms = team.losses(outs, maps, y[chunk], t)
            # Equal weight per micro-batch, exactly as DDP averages per-rank gradients.
            (sum(term["loss"] for term in terms) / len(chunks)).backward()
        for k, term in enumerate(terms):
            for name, value in term.items():
                totals[k][name] = totals[k].get(name, 0.0) + value.detach() * len(chunk)
            logits[k].append(outs[k].logits.detach())
    for k, peer_logits in enumerate(logits):
        totals[k]["logits"] = torch.cat(peer_logits)
    return totals


def _team_terms(totals: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The team's loss sums of a step: a single model's own (with its ``logits``), the peers'
    mean of each loss term for K > 1."""
    if len(totals) == 1:
        return totals[0]
    return {name: sum(own[name] for own in totals) / len(totals)
            for name in ("loss", "image", "patch", "transfer", "kl") if name in totals[0]}


def _agree_flags(loss: torch.Tensor, stop: bool, device, dist: Dist) -> tuple[bool, bool]:
    flags = torch.stack([(~torch.isfinite(loss)).float(),
                         torch.tensor(float(stop), device=device)])
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
    bad, wants_stop = flags.tolist()
    return bool(bad), bool(wants_stop)


def _accumulate(sums, team, totals, y, multilabel: bool) -> None:
    """Add a step's loss sums (the team's, and for K > 1 each peer's under ``peers``) and the
    correct predictions of each peer's ``logits`` (``correct``, single-label only)."""
    _add_terms(sums, team, y, multilabel)
    if len(totals) > 1:
        own_sums = sums.setdefault("peers", [{} for _ in totals])
        for own, terms in zip(own_sums, totals, strict=True):
            _add_terms(own, terms, y, multilabel)
    sums["seen"] += y.shape[0]


def _add_terms(sums: dict, terms: dict, y, multilabel: bool) -> None:
    for key, value in terms.items():
        if key != "logits":
            sums[key] = sums.get(key, 0.0) + value
        elif not multilabel:
            sums["correct"] = sums.get("correct", 0.0) + (value.argmax(1) == y).sum()


def _epoch_row(epoch, sums, lr, patch_weight, seconds, multilabel) -> dict:
    seen = max(sums["seen"].item(), 1.0)
    row = {"epoch": epoch, "lr": lr, "patch_weight": patch_weight,
           "train_loss": sums["loss"].item() / seen,
           "train_image_loss": sums["image"].item() / seen,
           "train_patch_loss": sums["patch"].item() / seen, "epoch_s": seconds,
           "images_per_s": seen / max(seconds, 1e-9)}
    if "peers" not in sums:  # a single model
        if not multilabel:
            row["train_acc"] = sums["correct"].item() / seen
        return row
    for name in ("transfer", "kl"):
        if name in sums:
            row[f"train_{name}_loss"] = sums[name].item() / seen
    row["peers"] = [{"train_loss": own["loss"].item() / seen,
                     **({} if multilabel else {"train_acc": own["correct"].item() / seen})}
                    for own in sums["peers"]]
    if not multilabel:  # the peers' mean, as for every other plain name of a team
        row["train_acc"] = sum(own["train_acc"] for own in row["peers"]) / len(row["peers"])
    return row


def _reduce_sums(sums: dict[str, torch.Tensor], dist: Dist) -> None:
    """Epoch statistics over all ranks (each rank saw its slice of every batch)."""
    if dist.world > 1:
        import torch.distributed as tdist

        for key, value in sums.items():
            for tensor in ([t for own in value for t in own.values()] if key == "peers"
                           else [value]):
                tdist.all_reduce(tensor)


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
