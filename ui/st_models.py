"""The run store, the models and their data, cached per server process; the model choice.

Models and data sets are cached per process and keyed by file path and mtime, so a retrained run
is picked up and two browser sessions share one copy; explanation hooks mutate a model, so a lock
comes with it. The same holds for what is derived from a model (its pass over the test images, its
maps, its Table VI ablation partner), and for the sidebar's model choice, which reads the shipped
models and the run store. Torch, which every model needs, is imported here in the background
(:func:`preload_torch`), and the sidebar's device line waits on that import; the event and lock
that track it exist once, here.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st

from engine.config import DataConfig, config_from_dict
from engine.runs import Run, RunStore
from engine.safe_io import read_json
from ui.st_session import MODEL_KEY, keep, remember, remembered

if TYPE_CHECKING:  # torch and the models load on the pages that need them, not on Home
    from engine.data.base import ImageSet
    from engine.evaluate import Collected
    from engine.models import PatchModel

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIR = PROJECT_ROOT / "checkpoints"
log = logging.getLogger("lossattn.app")


# ----------------------------------------------------------------------------------------------
# The run store and the models


@st.cache_resource
def _store(root: str) -> RunStore:
    return RunStore(root)


def store() -> RunStore:
    from engine.runs import default_runs_root

    return _store(str(default_runs_root().resolve()))


@dataclass
class LoadedModel:
    model: PatchModel
    checkpoint: dict
    lock: threading.Lock
    path: str

    @property
    def data_config(self) -> DataConfig:
        return config_from_dict(DataConfig, self.checkpoint["run_config"]["data"])

    @property
    def classes(self) -> list[str]:
        return list(self.checkpoint.get("classes") or [])


# Room for a whole γmax family (7 shipped models) and a few more: sliding γmax back to a model
# used before must not load it again (each holds 1.6 MB of weights and 1.4 MB of patch logits
# for its 1,000 test images).
MODELS_KEPT = 12


@st.cache_resource(max_entries=MODELS_KEPT, show_spinner="Loading the model...")
def _load(path: str, mtime_ns: int) -> LoadedModel:
    del mtime_ns  # part of the cache key: a rewritten checkpoint is loaded again
    from engine.checkpoint import load_model

    model, ckpt = load_model(path)
    model.eval()
    return LoadedModel(model, ckpt, threading.Lock(), path)


def loaded_model(path: str | Path) -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} is gone (deleted run?); pick another model")
    return _load(str(path), path.stat().st_mtime_ns)


@st.cache_resource(max_entries=6, show_spinner="Loading the test images...")
def _test_set(data_json: str) -> ImageSet:
    import json

    from engine.data import load_split

    return load_split(config_from_dict(DataConfig, json.loads(data_json)), "test")


def _data_key(cfg: DataConfig) -> str:
    import json

    from engine.config import config_to_dict

    return json.dumps(config_to_dict(cfg), sort_keys=True)


def test_set(cfg: DataConfig) -> ImageSet:
    return _test_set(_data_key(cfg))


@st.cache_resource(max_entries=MODELS_KEPT,
                   show_spinner="Running the model over the test images...")
def _collected(path: str, mtime_ns: int, data_json: str, limit: int) -> tuple[ImageSet, Collected]:
    del mtime_ns
    import torch

    from engine.evaluate import collect

    loaded = _load(path, Path(path).stat().st_mtime_ns)
    data = _test_set(data_json)
    if limit and len(data) > limit:
        data = data.subset(torch.arange(limit))
    with loaded.lock:
        collected = collect(loaded.model, data, torch.device("cpu"))
    _return_freed_memory()
    return data, collected


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``). A model's pass
    over the test images frees its batches' activations, which glibc keeps mapped, so every
    model the server opens (a γmax family has seven) would leave the process bigger for
    good. A no-op where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def collected_test_set(loaded: LoadedModel, limit: int = 1000) -> tuple[ImageSet, Collected]:
    """The model's test set (the first ``limit`` images) and its ξ cache: one backbone pass per
    (checkpoint, data, limit), shared by the Explorer, the Curves and every session."""
    return _collected(loaded.path, Path(loaded.path).stat().st_mtime_ns,
                      _data_key(loaded.data_config), limit)


@st.cache_resource(max_entries=8)
def _map_memo(path: str, mtime_ns: int, data_json: str, method: str) -> dict:
    del path, mtime_ns, data_json, method  # the cache key: one memo per model, data and method
    return {}


def map_memo(loaded: LoadedModel, method: str) -> dict:
    """The maps of ``method`` made so far for the model's test images, keyed (image, class), for
    :func:`engine.explain.remembered_maps`; shared by every session, so use it under
    ``loaded.lock``."""
    return _map_memo(loaded.path, Path(loaded.path).stat().st_mtime_ns,
                     _data_key(loaded.data_config), method)


DEFAULT_SHIPPED = "digits_small_cnn_la"  # the model a first visit explains


def _shipped_order(path: Path) -> tuple:
    """The default model first, then by name, a family's members by γmax (``..._gamma0.01``
    after ``..._gamma0``, not after it as text)."""
    match = re.fullmatch(r"(.*_gamma)(\d+(?:\.\d+)?)", path.stem)
    family = (match.group(1), float(match.group(2))) if match else (path.stem, -1.0)
    return (path.stem != DEFAULT_SHIPPED, *family)


def model_sources() -> dict[str, str]:
    """Label -> checkpoint path: the shipped models, then every run with a best checkpoint."""
    sources = {f"shipped: {p.stem}": str(p)
               for p in sorted(SHIPPED_DIR.glob("*.pt"), key=_shipped_order)}
    try:
        runs = store()
        rows = runs.list()
    except (OSError, ValueError) as exc:  # a broken run store must not hide the shipped models
        log.warning("run store unusable (%s); offering the shipped models only", exc)
        return sources
    for row in rows:
        run = Run(runs.root / row["name"])
        if run.best_checkpoint.is_file():
            sources[f"run: {row['name']}"] = str(run.best_checkpoint)
        # A mutual-transfer run: each peer on its own (peer 0 is also the run's best).
        for k, path in enumerate(run.peer_checkpoints()):
            sources[f"run: {row['name']} · peer {k}"] = str(path)
    return sources


def current_model_path() -> str | None:
    """The checkpoint chosen in the sidebar (the first shipped model by default)."""
    sources = model_sources()
    label = remembered(MODEL_KEY)
    if label not in sources:
        label = next(iter(sources), None)
        remember(MODEL_KEY, label)
    return sources.get(label) if label else None


def require_model_path() -> str:
    """The chosen checkpoint; with none at all, say so on the page and stop it there."""
    path = current_model_path()
    if path is None:
        st.info("No model yet: train one on the Train page.")
        st.stop()
    return path


def model_picker() -> None:
    """The sidebar's model choice, shared by the explaining pages."""
    sources = model_sources()
    if not sources:
        st.sidebar.warning("No model yet: train one on the Train page.")
        return
    labels = list(sources)
    current = remembered(MODEL_KEY)
    if current not in labels:
        remember(MODEL_KEY, labels[0])
    st.sidebar.selectbox("Model to explain", labels, **keep(MODEL_KEY, labels[0]),
                         help="The shipped model, or the best checkpoint of any run.")


# ----------------------------------------------------------------------------------------------
# Table VI's pair: the same model trained with and without the patch loss


@st.cache_data(max_entries=256, show_spinner=False)
def run_config_at(path: str, mtime_ns: int) -> dict | None:
    """The run config of a checkpoint: its run's config.json when it has one (no weights are
    read), else the checkpoint's own copy; None for a file that is not a checkpoint."""
    del mtime_ns

    config = Path(path).parents[1] / "config.json"
    try:
        if config.is_file():
            return read_json(config, "a run config")
        from engine.checkpoint import load_checkpoint

        return load_checkpoint(path)["run_config"]
    except (OSError, ValueError):
        return None


def patch_loss_partner(path: str) -> str | None:
    """The model source label of ``path``'s ablation partner (:func:`engine.explore.
    patch_loss_partner`): the shipped γmax = 0 model for the shipped one, or a sweep cell."""
    return _partner(path, Path(path).stat().st_mtime_ns)


@st.cache_data(ttl=10, max_entries=32, show_spinner=False)
def _partner(path: str, mtime_ns: int) -> str | None:
    """Looked up again at most every 10 s (a new run may pair), not on every ξ move: the scan
    reads the run list and every run's config."""
    del mtime_ns
    from engine.explore import patch_loss_partner as partners

    mine = run_config_at(path, Path(path).stat().st_mtime_ns)
    if mine is None:
        return None
    for label, other in model_sources().items():
        if other == path or not Path(other).is_file():
            continue
        theirs = run_config_at(other, Path(other).stat().st_mtime_ns)
        with contextlib.suppress(ValueError):
            if theirs is not None and partners(mine, theirs):
                return label
    return None


# ----------------------------------------------------------------------------------------------
# Torch and the device


def device_badge() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    return f"CPU ({torch.get_num_threads()} threads)"


_TORCH_LOADED = threading.Event()
_PRELOAD_STARTED = threading.Lock()  # held for good by the first caller of preload_torch


def preload_torch() -> None:
    """Import torch on a background thread, once per server process.

    Home needs no torch, but every explaining page does, and importing it is most of a cold
    first visit (about 1 s of the Explorer's here). Started after Home is drawn, the import
    runs while a user reads it; a page that needs torch sooner waits on Python's import lock
    for the same import, never a second one. Only torch: it imports nothing of this project,
    so the two threads cannot wait on each other's imports."""
    if not _PRELOAD_STARTED.acquire(blocking=False):
        return

    def load() -> None:
        try:
            import torch  # noqa: F401
        finally:  # a failed import is tried again, and fails, where a page imports torch
            _TORCH_LOADED.set()

    threading.Thread(target=load, name="preload-torch", daemon=True).start()


def device_footer() -> None:
    """The sidebar's last line: the device and the run folder.

    The device needs torch. A page that imported torch has it at once; on Home (the first
    page), a small fragment shows the line without the device and polls the background
    import (:func:`preload_torch`), then reruns the app once to draw the full line, so that
    Home finishes without waiting a second for torch."""
    from engine.runs import default_runs_root

    preload_torch()
    runs = f"runs in `{default_runs_root()}`"
    if _torch_loaded():
        st.sidebar.caption(f"{device_badge()} · {runs}")
        return
    with st.sidebar:
        _device_pending(runs)


def _torch_loaded() -> bool:
    """Whether torch is imported and done initialising: by a page of this run, or by the
    background import (which may not have had a turn yet on a busy machine)."""
    if _TORCH_LOADED.is_set():
        return True
    module = sys.modules.get("torch")
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


@st.fragment(run_every=0.5)
def _device_pending(runs: str) -> None:
    if _torch_loaded():
        st.rerun()  # the whole app: the next run draws the full line, without this fragment
    st.caption(f"Device: loading torch… · {runs}")

