"""Training recipes: the optimizer and the learning-rate schedule, one table entry each.

``train.recipe`` names an entry (``auto``: the head's own, ``HeadSpec.recipe``). A new recipe is
one entry here; its name must also be in ``engine.config.RECIPE_NAMES``, so that a config can
ask for it.
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
    lr_at: Callable[[int, TrainConfig], float]
    """The learning rate of an epoch (constant within it)."""
    betas_at: Callable[[int, TrainConfig], tuple[float, float]] | None = None
    """Adam's betas per epoch, where the recipe changes them."""


def _sgd_lr(epoch: int, cfg: TrainConfig) -> float:
    """The paper's step decay: x ``lr_decay`` at each milestone (50 % and 75 % of the run)."""
    passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.milestones)
    return cfg.lr * cfg.lr_decay ** passed


def _adam_lr(epoch: int, cfg: TrainConfig) -> float:
    """The paper's Mean-pooling / Dynamic Routing schedule: a Gaussian ramp-up over 40 % of the
    epochs (its 80 of 200), flat to 60 %, then x0.1 and x0.01 at 60 % and 80 %."""
    ramp = max(1, round(0.4 * cfg.epochs))
    if epoch < ramp:
        return cfg.lr * math.exp(-5.0 * (1.0 - epoch / ramp) ** 2)
    if epoch < round(0.6 * cfg.epochs):
        return cfg.lr
    return cfg.lr * (0.1 if epoch < round(0.8 * cfg.epochs) else 0.01)


def _adam_betas(epoch: int, cfg: TrainConfig) -> tuple[float, float]:
    """β2 0.99 during the ramp-up, 0.999 after it (the paper)."""
    return (0.9, 0.999 if epoch >= round(0.4 * cfg.epochs) else 0.99)


RECIPES: dict[str, Recipe] = {
    "sgd": Recipe(
        lr=0.1, weight_decay=5e-4, lr_at=_sgd_lr,
        optimizer=lambda params, cfg: torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)),
    "adam": Recipe(
        lr=0.003, weight_decay=0.0, lr_at=_adam_lr, betas_at=_adam_betas,
        optimizer=lambda params, cfg: torch.optim.Adam(
            params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)),
}


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """Learning rate of an epoch for the resolved recipe of ``cfg``."""
    return RECIPES[cfg.recipe].lr_at(epoch, cfg)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return RECIPES[cfg.recipe].optimizer(model.parameters(), cfg)


def set_epoch_hyperparameters(optimizer: torch.optim.Optimizer, epoch: int,
                              cfg: TrainConfig) -> float:
    """Set the epoch's learning rate (and betas, where the recipe moves them); returns the lr."""
    recipe = RECIPES[cfg.recipe]
    lr = recipe.lr_at(epoch, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if recipe.betas_at is not None:
            group["betas"] = recipe.betas_at(epoch, cfg)
    return lr
