"""Checkpoints: one dict holding the run config, every peer's model and optimizer state, and
progress.

The layout (version 2) holds a team of K peers, and a single model is a team of one::

    {"format": FORMAT, "version": 2, "run_config": {...},   # peer k's model: model /
     "peers": [{"model": state_dict, "optimizer": state},   #   transfer.peers[k - 1]
               ...],                                        # optimizer: last.pt only
     "progress": ..., "rng": ..., "metrics": ..., "classes": ..., "checksum": ...}

Older layouts still load (:func:`checkpoint_peers` reads all of them); every tool that opens
a checkpoint (:func:`load_model`, export, evaluate, explain, the Explorer) sees peer 0 unless
told otherwise.

Written atomically (temp file in the same folder, fsync, rename) so a crash mid-write leaves the
previous checkpoint intact. Always loaded with ``weights_only=True``: a checkpoint is data and
never runs code. A file that is corrupt, foreign, or of another architecture raises
:class:`CheckpointError` with a message naming the file and the problem.

Every checkpoint this program writes carries a checksum (issue 30: a file with 256 flipped bytes
loaded without a word, its accuracy down from 1.00 to 0.19, because torch checks no CRC). It
covers the whole dict as saved: every tensor wherever it sits (the model's state, the optimizer
states, the other peers' weights, the RNG state), each with its place in the dict, dtype, shape
and raw bytes, and the plain data beside them (config, metrics, classes, progress), so a
damaged config or metric is caught too. Only the checksum itself and the load-time note are
left out. A checkpoint written before checksums still loads, with a logged warning and a note
under :data:`NOTE_KEY` on the returned dict.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import ConfigError, ModelConfig, config_from_dict
from engine.errors import CheckpointError, FileRefused
from engine.fsutil import atomic_write
from engine.safe_io import CHECKPOINT_CAP, open_bounded

log = logging.getLogger(__name__)

FORMAT = "loss-attention-studio/checkpoint"
VERSION = 2
"""2: every peer under ``peers``. 1 (and 0, before versions): the previous layouts, with the
model (peer 0) at the top level; see :func:`checkpoint_peers`."""

CHECKSUM_KEY = "checksum"
"""Where a checkpoint keeps its checksum: ``"sha256:<64 hex digits>"``."""
NOTE_KEY = "integrity_note"
"""Set by :func:`load_checkpoint` on a checkpoint that could not be verified (one written
before checksums): a one-line note for the person using it (the app's model picker, ``runs
show``, ``evaluate`` could show it). Absent on a verified checkpoint; never written to a file."""
ORIGIN_KEY = "unverified_origin"
"""Kept (and covered by the checksum) when a checkpoint that could not be verified is saved
again, an export of an old run say: a fresh checksum must not make its contents look verified."""
_UNCOVERED = (CHECKSUM_KEY, NOTE_KEY)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write ``obj`` to ``path`` atomically; a checkpoint of this project (a dict with the
    format marker) gets a fresh checksum, so every save site is covered without knowing it."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = with_checksum(obj)
    atomic_write(path, lambda fh: torch.save(obj, fh))


def with_checksum(ckpt: dict) -> dict:
    """A copy of ``ckpt`` carrying the checksum of its contents (an old checksum or a
    load-time note it holds is dropped first: they describe the file it was read from). A note
    that it was unverified becomes :data:`ORIGIN_KEY`, which stays with every later copy."""
    body = {key: value for key, value in ckpt.items() if key not in _UNCOVERED}
    if ckpt.get(NOTE_KEY) and ORIGIN_KEY not in body:
        body[ORIGIN_KEY] = str(ckpt[NOTE_KEY])
    return {**body, CHECKSUM_KEY: checkpoint_checksum(body)}


def checkpoint_checksum(ckpt: dict) -> str:
    """SHA-256 of ``ckpt`` without its checksum and note, as ``"sha256:<hex>"``.

    Deterministic across processes and devices: dict entries are taken in sorted order of
    their keys' ``repr``, and a tensor is hashed as its dtype, shape and raw bytes (after
    moving it to the CPU), so any dtype (bf16 and fp16 included) hashes as stored. Every token
    is tagged and length-prefixed, so no two different structures feed the same bytes."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in ckpt.items() if key not in _UNCOVERED})
    return f"sha256:{digest.hexdigest()}"


def _token(digest, tag: bytes, payload: bytes | memoryview) -> None:
    digest.update(tag + str(len(payload)).encode() + b":")
    digest.update(payload)


def _feed(digest, value: Any) -> None:
    """Feed ``value`` (nested dicts, lists, tuples, tensors and plain leaves) to ``digest``."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        _token(digest, b"T", f"{value.dtype}{tuple(value.shape)}".encode())
        _token(digest, b"B", memoryview(flat.numpy()))
    elif isinstance(value, dict):
        _token(digest, b"{", str(len(value)).encode())
        for key in sorted(value, key=repr):
            _token(digest, b"K", repr(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        _token(digest, b"[" if isinstance(value, list) else b"(", str(len(value)).encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (set, frozenset)):  # sorted: a set's order changes between runs
        _token(digest, b"S", repr(sorted(map(repr, value))).encode())
    else:
        _token(digest, b"V", f"{type(value).__name__}:{value!r}".encode())


def make_checkpoint(run_config: dict, models: nn.Module | Sequence[nn.Module],
                    optimizers: Sequence[dict] | None = None, **extra: Any) -> dict:
    """The checkpoint dict of a team (one model: a team of one), in the order of the run's
    models; ``optimizers``: each peer's optimizer state (what resume needs); ``extra`` holds
    progress, rng, metrics, classes."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    peers = [{"model": {k: v.detach().cpu() for k, v in m.state_dict().items()}}
             for m in models]
    for entry, state in zip(peers, optimizers or [], strict=optimizers is not None):
        entry["optimizer"] = state
    return {"format": FORMAT, "version": VERSION, "run_config": run_config, "peers": peers,
            **extra}


def checkpoint_peers(ckpt: dict, shown: str | Path = "checkpoint") -> list[dict]:
    """Every peer's entry, ``{"model": state_dict}`` plus ``"optimizer"`` where saved, in the
    order of the run's models, from any layout this program has written:

    - version 2 (this one): ``ckpt["peers"]``, one entry per peer; a single model is a team of
      one.
    - version 1 (and 0, before versions), a single model: ``model`` (its state dict) and, in
      ``last.pt``, ``optimizer`` at the top level.
    - version 1, a mutual-transfer run: peer 0 at the top level as a single model's, peers
      1.. under ``peers`` as ``{"model": state_dict, "optimizer": state}`` (``optimizer`` in
      ``last.pt`` only).

    A missing or malformed entry raises :class:`CheckpointError` naming ``shown``."""
    version = ckpt.get("version", 0)
    if isinstance(version, int) and version >= 2:
        entries = ckpt.get("peers")
        if not isinstance(entries, list) or not entries:
            raise CheckpointError(f"checkpoint {shown} lacks 'peers' (or it is not a list of "
                                  "peers)")
    else:
        if not isinstance(ckpt.get("model"), dict):
            raise CheckpointError(f"checkpoint {shown} lacks 'model' (or it is not a mapping)")
        others = ckpt.get("peers", [])
        if not isinstance(others, list):
            raise CheckpointError(f"checkpoint {shown}: its 'peers' entry is malformed")
        top = {key: ckpt[key] for key in ("model", "optimizer") if key in ckpt}
        entries = [top, *others]
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), dict):
            raise CheckpointError(f"checkpoint {shown}: peer {k} has no weights (its 'model' "
                                  "is missing or not a mapping)")
    return entries


def peer_state(ckpt: dict, peer: int = 0, shown: str | Path = "checkpoint") -> dict:
    """Peer ``peer``'s model state dict (any layout: :func:`checkpoint_peers`)."""
    entries = checkpoint_peers(ckpt, shown)
    if not 0 <= peer < len(entries):
        raise CheckpointError(f"checkpoint {shown} holds {len(entries)} peer(s); there is no "
                              f"peer {peer}")
    return entries[peer]["model"]


def load_checkpoint(path: str | Path) -> dict:
    """Read and check a checkpoint (tensors land on the CPU).

    Anything that is not a checkpoint of this project (empty, truncated, random bytes, another
    program's pickle, a directory, a FIFO or device) raises :class:`CheckpointError` naming
    the file, and so does one whose checksum does not match its contents or whose model holds
    NaN or inf. A checkpoint without a checksum (written before they existed) loads with a
    warning and a note under :data:`NOTE_KEY`. Loading never writes to the file."""
    shown = str(path)
    data = _read_checkpoint(path, shown)
    _check_layout(data, shown)
    _verify_checksum(data, shown)
    _refuse_non_finite(data, shown)
    return data


def _read_checkpoint(path: str | Path, shown: str) -> Any:
    """The unpickled contents of ``path``, read through the bounded opener (a regular file
    under :data:`CHECKPOINT_CAP`, opened without blocking so a FIFO cannot hang the load).
    torch's own message is not passed on: it advises loading with ``weights_only=False``,
    which would run the file's code."""
    try:
        fh = open_bounded(path, CHECKPOINT_CAP, "a checkpoint")
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {shown} does not exist") from exc
    except FileRefused as exc:
        raise CheckpointError(str(exc)) from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {shown}: {exc.strerror or exc}") from exc
    with fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise CheckpointError(f"{shown} is empty: not a checkpoint of this project (an "
                                  "interrupted copy?)")
        try:
            return torch.load(fh, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{shown} is not a checkpoint of this project: it holds objects other than "
                "tensors and plain data, and such files are never loaded here") from exc
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {shown}: "
                                  f"{exc.strerror or exc}") from exc
        except Exception as exc:  # torch raises many types for a damaged file
            raise CheckpointError(f"{shown} is not a checkpoint of this project: it is damaged "
                                  f"or not a PyTorch file ({exc.__class__.__name__})") from exc


def _check_layout(data: Any, shown: str) -> None:
    """The format marker, a version this program reads, the run config and every peer's
    weights (in the checkpoint's own layout)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{shown} is not a checkpoint of this project (no "
                              f"format={FORMAT!r} marker); it may come from another program")
    version = data.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"checkpoint {shown} has a malformed version {version!r}")
    if version > VERSION:
        raise CheckpointError(f"checkpoint {shown} has format version {data['version']}, newer "
                              f"than this program's {VERSION}")
    if not isinstance(data.get("run_config"), dict):
        raise CheckpointError(f"checkpoint {shown} lacks 'run_config' (or it is not a mapping)")
    checkpoint_peers(data, shown)


def _verify_checksum(data: dict, shown: str) -> None:
    """Compare the stored checksum with the contents; without one, warn and leave a note."""
    stored = data.get(CHECKSUM_KEY)
    if stored is None:
        note = (f"checkpoint {shown} carries no checksum (written before checkpoints had one): "
                "its contents could not be verified")
        log.warning("%s", note)
        data[NOTE_KEY] = note
        return
    if not isinstance(stored, str) or checkpoint_checksum(data) != stored:
        raise CheckpointError(f"checkpoint {shown} is damaged (checksum mismatch)")
    data.pop(NOTE_KEY, None)  # a stale note copied into the file describes another file
    if data.get(ORIGIN_KEY):  # intact since saved, but saved from an unverified checkpoint
        data[NOTE_KEY] = f"checkpoint {shown} was saved from an unverified one ({data[ORIGIN_KEY]})"


def _refuse_non_finite(data: dict, shown: str) -> None:
    """NaN or inf in any floating tensor of any peer's model is refused: such weights compute
    nothing meaningful, whatever their checksum says."""
    for k, entry in enumerate(checkpoint_peers(data, shown)):
        where, state = f" (peer {k})" if k else "", entry["model"]
        for name, tensor in state.items():
            if (isinstance(tensor, torch.Tensor)
                    and (tensor.is_floating_point() or tensor.is_complex())
                    and not bool(torch.isfinite(tensor).all())):
                raise CheckpointError(f"checkpoint {shown} holds non-finite values in "
                                      f"{name}{where}; refused")


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


def model_config_of(ckpt: dict, path: str | Path = "checkpoint", peer: int = 0) -> ModelConfig:
    """Peer ``peer``'s model config: the run config's ``model`` for peer 0, its
    ``transfer.peers[peer - 1]`` for the others."""
    try:
        run_config = ckpt["run_config"]
        models = [run_config["model"], *((run_config.get("transfer") or {}).get("peers") or [])]
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: its model config is unusable: {exc}") from exc
    if not 0 <= peer < len(models):
        raise CheckpointError(f"{path}: its config lists {len(models)} peer model(s); there is "
                              f"no peer {peer}")
    try:
        return config_from_dict(ModelConfig, models[peer])
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: its model config is unusable: {exc}") from exc


def load_state(model: nn.Module, ckpt: dict, path: str | Path = "checkpoint",
               peer: int = 0) -> None:
    """Load peer ``peer``'s weights into ``model``; a different architecture is an error."""
    mine = getattr(model, "config", None)
    theirs = model_config_of(ckpt, path, peer)
    if mine is not None:
        fields = ("backbone", "head", "num_classes", "in_chans", "stride_plan", "patch_kernel",
                  "patch_stride", "patch_channels")
        diff = [f"{f}: checkpoint {getattr(theirs, f)!r} vs model {getattr(mine, f)!r}"
                for f in fields if getattr(theirs, f) != getattr(mine, f)]
        if diff:
            raise CheckpointError(f"{path} is a checkpoint of another architecture ("
                                  + "; ".join(diff) + ")")
    state = peer_state(ckpt, peer, path)
    mismatch = state_mismatch(model.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{path} does not fit this model: {mismatch}")
    try:
        model.load_state_dict(state, strict=True)
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


def load_model(path: str | Path, device: str | torch.device = "cpu", peer: int = 0):
    """Rebuild a model (peer ``peer`` of a team; 0, the run's ``model``, by default) from a
    checkpoint alone. Returns ``(model in eval mode, checkpoint)``."""
    from engine.models import build_model

    ckpt = load_checkpoint(path)
    model = build_model(model_config_of(ckpt, path, peer))
    load_state(model, ckpt, path, peer)
    return model.to(device).eval(), ckpt
