"""Checkpoints: one dict holding the run config, model and optimizer state and progress.

Written atomically (temp file in the same folder, fsync, rename) so a crash mid-write leaves the
previous checkpoint intact. Always loaded with ``weights_only=True``: a checkpoint is data and
never runs code. A file that is corrupt, foreign, or of another architecture raises
:class:`CheckpointError` with a message naming the file and the problem.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import ConfigError, ModelConfig, config_from_dict
from engine.errors import CheckpointError
from engine.fsutil import atomic_write

FORMAT = "loss-attention-studio/checkpoint"
VERSION = 1


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def make_checkpoint(run_config: dict, model: nn.Module, **extra: Any) -> dict:
    """The checkpoint dict; ``extra`` holds optimizer state, progress, rng, metrics, classes."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "version": VERSION, "run_config": run_config, "model": state,
            **extra}


def load_checkpoint(path: str | Path) -> dict:
    """Read and check a checkpoint (tensors land on the CPU).

    Anything that is not a checkpoint of this project (empty, truncated, random bytes, another
    program's pickle, a directory) raises :class:`CheckpointError` naming the file. torch's own
    message is not passed on: it advises loading with ``weights_only=False``, which would run
    the file's code."""
    path = Path(path)
    if not path.is_file():
        what = ("is a folder" if path.is_dir() else "is not a regular file" if path.exists()
                else "does not exist")
        raise CheckpointError(f"checkpoint {path} {what}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty: not a checkpoint of this project (an "
                              "interrupted copy?)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project: it holds objects other than tensors "
            "and plain data, and such files are never loaded here") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path} is not a checkpoint of this project: it is damaged or "
                              f"not a PyTorch file ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no "
                              f"format={FORMAT!r} marker); it may come from another program")
    version = data.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"checkpoint {path} has a malformed version {version!r}")
    if version > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {data['version']}, newer "
                              f"than this program's {VERSION}")
    for key in ("run_config", "model"):
        if not isinstance(data.get(key), dict):
            raise CheckpointError(f"checkpoint {path} lacks {key!r} (or it is not a mapping)")
    return data


def check_classes(theirs, mine: list[str], what: str, force: bool = False,
                  hint: str = "Use the data it was trained on, or force it (evaluate "
                              "--allow-class-mismatch)") -> None:
    """Refuse data whose class names differ from the model's (``theirs``: the checkpoint's
    ``classes``; None for old checkpoints, which are checked by count only). ``force`` turns
    the refusal into nothing, for a user who means it; ``hint`` says what to do instead."""
    if theirs is None or force or list(theirs) == list(mine):
        return
    theirs = [str(c) for c in theirs]
    if len(theirs) != len(mine):
        detail = f"{len(theirs)} classes vs {len(mine)}"
    else:
        first = next(i for i, (a, b) in enumerate(zip(theirs, mine, strict=True)) if a != b)
        detail = f"class {first} is {theirs[first]!r} in the model but {mine[first]!r} here"
    raise CheckpointError(f"{what} was trained on other classes than this data set's ({detail}; "
                          f"model: {theirs[:5]}{' ...' if len(theirs) > 5 else ''}, data: "
                          f"{mine[:5]}{' ...' if len(mine) > 5 else ''}). {hint}")


def model_config_of(ckpt: dict, path: str | Path = "checkpoint") -> ModelConfig:
    try:
        return config_from_dict(ModelConfig, ckpt["run_config"]["model"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: its model config is unusable: {exc}") from exc


def load_state(model: nn.Module, ckpt: dict, path: str | Path = "checkpoint") -> None:
    """Load the checkpoint's weights into ``model``; a different architecture is an error."""
    mine = getattr(model, "config", None)
    theirs = model_config_of(ckpt, path)
    if mine is not None:
        fields = ("backbone", "head", "num_classes", "in_chans", "stride_plan", "patch_kernel",
                  "patch_stride", "patch_channels")
        diff = [f"{f}: checkpoint {getattr(theirs, f)!r} vs model {getattr(mine, f)!r}"
                for f in fields if getattr(theirs, f) != getattr(mine, f)]
        if diff:
            raise CheckpointError(f"{path} is a checkpoint of another architecture ("
                                  + "; ".join(diff) + ")")
    mismatch = state_mismatch(model.state_dict(), ckpt["model"])
    if mismatch:
        raise CheckpointError(f"{path} does not fit this model: {mismatch}")
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit this model: "
                              f"{str(exc).splitlines()[0]}") from exc


def state_mismatch(expected: dict, given: dict, shown: int = 3) -> str:
    """The first missing, unexpected and wrongly shaped keys of ``given`` ('' if it fits)."""
    def first(keys: list[str]) -> str:
        return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown
                                          else "")

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in given and hasattr(given[k], "shape") and given[k].shape != v.shape]
    parts = [f"missing keys {first(missing)}" if missing else "",
             f"unexpected keys {first(unexpected)}" if unexpected else "",
             f"wrong shapes {first(shapes)}" if shapes else ""]
    return "; ".join(p for p in parts if p)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a model from a checkpoint alone. Returns ``(model in eval mode, checkpoint)``."""
    from engine.models import build_model

    ckpt = load_checkpoint(path)
    model = build_model(model_config_of(ckpt, path))
    load_state(model, ckpt, path)
    return model.to(device).eval(), ckpt



def load_model_source(source: str | Path, runs_root: str | Path | None = None):
    """A checkpoint file, or the name of a run in the store at ``runs_root`` (its best
    checkpoint, else its last). Returns ``(model, checkpoint, run or None)``."""
    from engine.runs import RunStore

    path = Path(source)
    if path.suffix == ".pt" or path.is_file():
        model, ckpt = load_model(path)
        return model, ckpt, None
    run = RunStore(runs_root).get(str(source))
    best = run.best_checkpoint if run.best_checkpoint.is_file() else run.last_checkpoint
    model, ckpt = load_model(best)
    return model, ckpt, run
