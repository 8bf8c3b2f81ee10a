"""Training recipes: the optimizer and the learning-rate schedule, one table entry each.

``train.recipe`` names an entry (``auto``: the head's own, ``HeadSpec.recipe``). A new recipe is
one entry here; its name must also be in ``engine.config.RECIPE_NAMES``, so that a config can
ask for it.

A schedule is a pure function of the run's position ``t`` in epochs (``epoch + step / steps``),
set before every step: a resumed run, which restores epoch and step, gets the lr an
uninterrupted one would have had, with no scheduler state to checkpoint. The paper's recipes
change the lr only at epoch boundaries (they read ``floor(t)``); ``onecycle`` moves it every
step, as a run of one or two epochs needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from engine.config import TrainConfig


@dataclass(frozen=True)
class Recipe:
    lr: float
    """Peak learning rate when ``train.lr`` is not given."""
    weight_decay: float
    """Weight decay when ``train.weight_decay`` is not given."""
    optimizer: Callable[[Iterable[torch.nn.Parameter], TrainConfig], torch.optim.Optimizer]
    lr_at: Callable[[float, TrainConfig], float]
    """The learning rate at position ``t`` (epochs, fractional within one)."""
    betas_at: Callable[[float, TrainConfig], tuple[float, float]] | None = None
    """Adam's betas at position ``t``, where the recipe changes them."""


def _sgd_lr(t: float, cfg: TrainConfig) -> float:
    """The paper's step decay: x ``lr_decay`` at each milestone (50 % and 75 % of the run)."""
    epoch = math.floor(t)
    passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.milestones)
    return cfg.lr * cfg.lr_decay ** passed


ONECYCLE_WARMUP = 0.2
"""The share of the run over which ``onecycle`` rises to its peak lr."""
ONECYCLE_START = 0.1
"""Where ``onecycle`` starts, as a fraction of the peak lr."""


def _onecycle_lr(t: float, cfg: TrainConfig) -> float:
    """One cycle (Smith & Topin 2018, the schedule of fast small-image training such as
    airbench; torch's ``OneCycleLR`` with linear annealing): linear from 0.1 x lr to the peak
    over the first 20 % of the run, then linear down to 0 at its end. As a function of ``t``
    rather than ``OneCycleLR``'s step counter, so that resume needs no scheduler state."""
    f = min(max(t / cfg.epochs, 0.0), 1.0)
    if f < ONECYCLE_WARMUP:
        return cfg.lr * (ONECYCLE_START + (1.0 - ONECYCLE_START) * f / ONECYCLE_WARMUP)
    return cfg.lr * (1.0 - f) / (1.0 - ONECYCLE_WARMUP)


def _adam_lr(t: float, cfg: TrainConfig) -> float:
    """The paper's Mean-pooling / Dynamic Routing schedule: a Gaussian ramp-up over 40 % of the
    epochs (its 80 of 200), flat to 60 %, then x0.1 and x0.01 at 60 % and 80 %."""
    epoch = math.floor(t)
    ramp = max(1, round(0.4 * cfg.epochs))
    if epoch < ramp:
        return cfg.lr * math.exp(-5.0 * (1.0 - epoch / ramp) ** 2)
    if epoch < round(0.6 * cfg.epochs):
        return cfg.lr
    return cfg.lr * (0.1 if epoch < round(0.8 * cfg.epochs) else 0.01)


def _adam_betas(t: float, cfg: TrainConfig) -> tuple[float, float]:
    """β2 0.99 during the ramp-up, 0.999 after it (the paper)."""
    return (0.9, 0.999 if math.floor(t) >= round(0.4 * cfg.epochs) else 0.99)


RECIPES: dict[str, Recipe] = {
    "sgd": Recipe(
        lr=0.1, weight_decay=5e-4, lr_at=_sgd_lr,
        optimizer=lambda params, cfg: torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)),
    # Nesterov SGD with a one-cycle lr: the short schedule of the live presets (engine.presets).
    "onecycle": Recipe(
        lr=0.2, weight_decay=5e-4, lr_at=_onecycle_lr,
        optimizer=lambda params, cfg: torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay)),
    "adam": Recipe(
        lr=0.003, weight_decay=0.0, lr_at=_adam_lr, betas_at=_adam_betas,
        optimizer=lambda params, cfg: torch.optim.Adam(
            params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)),
}


def lr_at(t: float, cfg: TrainConfig) -> float:
    """Learning rate at position ``t`` (epochs) for the resolved recipe of ``cfg``."""
    return RECIPES[cfg.recipe].lr_at(t, cfg)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return RECIPES[cfg.recipe].optimizer(model.parameters(), cfg)


def set_hyperparameters(optimizer: torch.optim.Optimizer, t: float, cfg: TrainConfig) -> float:
    """Set the learning rate (and betas, where the recipe moves them) for position ``t``;
    returns the lr."""
    recipe = RECIPES[cfg.recipe]
    lr = recipe.lr_at(t, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if recipe.betas_at is not None:
            group["betas"] = recipe.betas_at(t, cfg)
    return lr
