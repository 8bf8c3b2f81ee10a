"""Checkpoints: one dict holding the run config, model and optimizer state and progress.

Written atomically (temp file in the same folder, fsync, rename) so a crash mid-write leaves the
previous checkpoint intact. Always loaded with ``weights_only=True``: a checkpoint is data and
never runs code. A file that is corrupt, foreign, or of another architecture raises
:class:`CheckpointError` with a message naming the file and the problem.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import ConfigError, ModelConfig, config_from_dict
from engine.fsutil import atomic_write

FORMAT = "loss-attention-studio/checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message says which file and why."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def make_checkpoint(run_config: dict, model: nn.Module, **extra: Any) -> dict:
    """The checkpoint dict; ``extra`` holds optimizer state, progress, rng, metrics, classes."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "version": VERSION, "run_config": run_config, "model": state,
            **extra}


def load_checkpoint(path: str | Path) -> dict:
    """Read and check a checkpoint (tensors land on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data; refused "
            f"(weights_only=True): {str(exc).splitlines()[0]}") from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file "
                              f"({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Loss-Attention Studio checkpoint (no "
                              f"format={FORMAT!r} marker); it may come from another program")
    if data.get("version", 0) > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {data['version']}, newer "
                              f"than this program's {VERSION}")
    for key in ("run_config", "model"):
        if key not in data:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}")
    return data


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
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit this model: "
                              f"{str(exc).splitlines()[0]}") from exc


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a model from a checkpoint alone. Returns ``(model in eval mode, checkpoint)``."""
    from engine.models import build_model

    ckpt = load_checkpoint(path)
    model = build_model(model_config_of(ckpt, path))
    load_state(model, ckpt, path)
    return model.to(device).eval(), ckpt

