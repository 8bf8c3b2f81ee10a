"""What a background job runs: its kind and its settings, typed, as written to ``spec.json``.

The starter of a job (:func:`engine.launch.start`, :func:`engine.sweep.launch_sweep`,
:func:`engine.bench.start_stride_bench`, :func:`engine.mil.experiment.start_experiment`)
builds one of these specs and hands it to :meth:`engine.jobs.Job.spawn`, which writes it to the
job folder's ``spec.json`` and starts ``python -m engine job FOLDER``; that process reads the
spec back (:func:`read_spec`) and runs it (:mod:`engine.job_run`). So a job's settings are data
in its folder (readable, checkable, the same whoever starts it: the app, a script, the queue),
not a command line built in one place and parsed in another.

``spec.json`` is ``{"kind": ..., "version": 1, <the spec's fields>}``. A malformed or unknown
spec raises :class:`SpecError`, which names the file and the field.

This module imports no torch and no job runner: :mod:`engine.jobs` and every starter use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from engine.errors import JobError
from engine.safe_io import read_json

if TYPE_CHECKING:
    from engine.mil.config import MilConfig

SPEC_FILE = "spec.json"
SPEC_VERSION = 1


class SpecError(JobError):
    """A job's spec is malformed or of an unknown kind; the message names the field."""


# ----------------------------------------------------------------------------------------------
# Field checks: each returns what is wrong with a value, or None


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "must be non-empty text"


def _optional_text(v: Any) -> str | None:
    return None if v is None else _text(v)


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _count(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else (
        "must be an int >= 1")


def _optional_count(v: Any) -> str | None:
    return None if v is None else _count(v)


def _non_negative(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
    return None if ok else "must be a number >= 0"


def _non_negative_int(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
    return None if ok else "must be an int >= 0"


def _names(v: Any) -> str | None:
    ok = isinstance(v, list | tuple) and v and all(isinstance(x, str) and x for x in v)
    return None if ok else "must be a non-empty list of names"


def _parallel(v: Any) -> str | None:
    return None if v == "auto" or _count(v) is None else "must be an int >= 1 or 'auto'"


def _grid(v: Any) -> str | None:
    ok = isinstance(v, list | tuple) and all(
        isinstance(axis, list | tuple) and len(axis) == 2 and isinstance(axis[0], str)
        and isinstance(axis[1], list | tuple) and axis[1] for axis in v)
    return None if ok else "must be a list of [field, [values...]] pairs"


def _pairs(v: Any) -> str | None:
    ok = isinstance(v, list | tuple) and v and all(
        isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(x, str) and x for x in p)
        for p in v)
    return None if ok else "must be a non-empty list of [backbone, head] pairs"


def _plans(v: Any) -> str | None:
    ok = isinstance(v, list | tuple) and all(
        p is None or (isinstance(p, list | tuple) and p and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in p)) for p in v)
    return None if ok else "must be a list of stride plans (lists of ints >= 1) or nulls"


def _executor(v: Any) -> str | None:
    return None if v in ("local", "ray") else "must be 'local' or 'ray'"


def _mil_config(v: Any) -> str | None:
    return None if isinstance(v, dict) else "must be a JSON object (MilConfig's fields)"


def _tuples(v: Any) -> Any:
    """JSON lists as tuples, all the way down (a spec is frozen)."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list | tuple) else v


def _lists(v: Any) -> Any:
    return [_lists(x) for x in v] if isinstance(v, list | tuple) else v


# ----------------------------------------------------------------------------------------------
# The spec of each kind


class _Spec:
    """What the specs share: their kind, their field checks, and the JSON round trip."""

    kind: ClassVar[str]
    checks: ClassVar[dict[str, Callable[[Any], str | None]]]

    def to_dict(self) -> dict:
        fields = {f.name: _lists(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"kind": self.kind, "version": SPEC_VERSION, **fields}

    @classmethod
    def from_dict(cls, data: dict, where: str = SPEC_FILE):
        """The spec from its JSON (``kind`` and ``version`` already read by
        :func:`spec_from_dict`); a missing, unknown or malformed field raises SpecError."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise SpecError(f"{where}: unknown field {unknown[0]!r} for a {cls.kind} job "
                            f"(its fields: {', '.join(fields)})")
        values = {}
        for name, f in fields.items():
            if name not in data:
                if f.default is dataclasses.MISSING:
                    raise SpecError(f"{where}: field {name!r} is missing (a {cls.kind} job "
                                    "needs it)")
                continue
            problem = cls.checks[name](data[name])
            if problem:
                raise SpecError(f"{where}: field {name!r} {problem}; got {data[name]!r:.80}")
            values[name] = _tuples(data[name])
        return cls(**values)

    def __post_init__(self) -> None:
        """Checked at construction too: a starter's mistake is named before anything starts."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.checks:
                problem = self.checks[f.name](_lists(value))
                if problem:
                    raise SpecError(f"a {self.kind} job's field {f.name!r} {problem}; "
                                    f"got {value!r:.80}")
                object.__setattr__(self, f.name, _tuples(value))


@dataclass(frozen=True)
class TrainSpec(_Spec):
    """Train (or resume) the run in ``run_dir``, the job's own folder
    (what ``python -m engine train --run-dir DIR [--resume]`` does)."""

    kind: ClassVar[str] = "train"
    checks: ClassVar[dict] = {"run_dir": _text, "resume": _flag}
    run_dir: str
    resume: bool = False


@dataclass(frozen=True)
class SweepSpec(_Spec):
    """Train a sweep's grid and write its report (``python -m engine sweep``). ``config``: the
    base run config's JSON file (the sweep folder's ``base.json``); ``parallel``: cells at
    once, or ``"auto"``; ``executor`` ``"ray"``: the cells are tasks on that Ray cluster."""

    kind: ClassVar[str] = "sweep"
    checks: ClassVar[dict] = {
        "runs_dir": _text, "sweep": _text, "config": _text, "grid": _grid,
        "parallel": _parallel, "executor": _executor, "ray_address": _optional_text,
        "ray_cpus": _non_negative, "ray_gpus": _non_negative, "ray_retries": _non_negative_int,
        "device_eval": _text}
    runs_dir: str
    sweep: str
    config: str
    grid: tuple = ()
    parallel: int | str = 1
    executor: str = "local"
    ray_address: str | None = None
    ray_cpus: float = 1.0
    ray_gpus: float = 0.0
    ray_retries: int = 3
    device_eval: str = "auto"


@dataclass(frozen=True)
class BenchSpec(_Spec):
    """Measure models (``python -m engine bench``): each (backbone, head) at each stride plan
    (None: the backbone's own), results written to ``json`` when given."""

    kind: ClassVar[str] = "bench"
    checks: ClassVar[dict] = {
        "models": _pairs, "stride_plans": _plans, "input_size": _count, "batch": _count,
        "steps": _count, "warmup": _count, "num_classes": _count, "device": _text,
        "compare_fp32": _flag, "compile": _flag, "isolate": _flag, "json": _optional_text}
    models: tuple
    stride_plans: tuple = (None,)
    input_size: int = 32
    batch: int = 128
    steps: int = 5
    warmup: int = 1
    num_classes: int = 10
    device: str = "auto"
    compare_fp32: bool = False
    compile: bool = False
    isolate: bool = True
    json: str | None = None


@dataclass(frozen=True)
class MilSpec(_Spec):
    """Cross-validate MIL methods on data sets into the results folder ``out``
    (``python -m engine mil``). ``config``: MilConfig's fields (its ``method`` is replaced by
    each method in turn)."""

    kind: ClassVar[str] = "mil"
    checks: ClassVar[dict] = {
        "datasets": _names, "methods": _names, "config": _mil_config, "out": _text,
        "data_root": _optional_text, "threads": _optional_count}
    datasets: tuple
    methods: tuple
    config: dict
    out: str
    data_root: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if dataclasses.is_dataclass(self.config):  # a MilConfig, as a starter has it
            object.__setattr__(self, "config", self.config.to_dict())
        super().__post_init__()
        self.mil_config()  # MilConfig's own validation names a bad field

    def mil_config(self) -> MilConfig:
        from engine.config import config_from_dict
        from engine.mil.config import MilConfig

        try:
            return config_from_dict(MilConfig, dict(self.config))
        except ValueError as exc:
            raise SpecError(f"a mil job's field 'config': {exc}") from None


SPECS: dict[str, type[_Spec]] = {cls.kind: cls for cls in (TrainSpec, SweepSpec, BenchSpec,
                                                            MilSpec)}
JobSpec = TrainSpec | SweepSpec | BenchSpec | MilSpec


def spec_from_dict(data: Any, where: str = SPEC_FILE) -> JobSpec:
    """The spec a ``spec.json`` object describes; SpecError names what is wrong."""
    if not isinstance(data, dict):
        raise SpecError(f"{where} must hold a JSON object; it holds a {type(data).__name__}")
    body = dict(data)
    kind = body.pop("kind", None)
    version = body.pop("version", SPEC_VERSION)
    if kind not in SPECS:
        raise SpecError(f"{where}: field 'kind' must be one of {list(SPECS)}; got {kind!r:.40}")
    if version != SPEC_VERSION:
        raise SpecError(f"{where}: field 'version' must be {SPEC_VERSION} (this version of the "
                        f"project); got {version!r:.40}")
    return SPECS[kind].from_dict(body, where)


def read_spec(folder: str | Path) -> JobSpec:
    """The spec in a job folder's ``spec.json``; SpecError when it is missing or malformed."""
    path = Path(folder) / SPEC_FILE
    try:
        data = read_json(path, "a job spec")
    except FileNotFoundError:
        raise SpecError(f"{path} is missing: this folder was not started as a job") from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"{path} is unreadable ({exc})") from None
    return spec_from_dict(data, str(path))
